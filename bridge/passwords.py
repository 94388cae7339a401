"""Mosquitto's password file, read and written in its own format.

A line is `user:$7$<iterations>$<salt, base64>$<hash, base64>`: PBKDF2-HMAC-SHA512
over the password with a 12-byte salt, as `mosquitto_passwd` (2.0) writes it.
The older `$6$<salt>$<hash>` (SHA-512 of password + salt) is verified too.
Either tool can manage the same file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import tempfile
from pathlib import Path

# PBKDF2 rounds for new hashes (the `$7$` format stores the count, so older hashes keep working).
# Mosquitto checks a password on its single thread: at 10,000 rounds a first connect costs about
# 10 ms of CPU; the plugin remembers a verified password, and refuses an address's logins
# unchecked after repeated failures, so wrong passwords cannot buy that work in bulk.
ITERATIONS = 10_000
MIN_LENGTH = 10


class PasswordFileError(ValueError):
    pass


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify(password: str, stored: str) -> bool:
    parts = stored.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, want = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        elif len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def read(path: Path) -> dict[str, str]:
    """user -> stored hash, in file order."""
    entries: dict[str, str] = {}
    if not path.exists():
        return entries
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user:
            raise PasswordFileError(f"{path}:{number}: not a `user:hash` line")
        entries[user] = stored
    return entries


def write(path: Path, entries: dict[str, str]) -> None:
    """Replaces the file atomically. An existing file keeps its owner, group and mode (Mosquitto,
    running as its owner, must still read it); a new one is readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        before: os.stat_result | None = path.stat()
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{user}:{stored}\n" for user, stored in entries.items())
        if before is None:
            os.chmod(tmp, 0o600)
        else:
            if (before.st_uid, before.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(tmp, before.st_uid, before.st_gid)  # PermissionError: not ours to rewrite
            os.chmod(tmp, stat.S_IMODE(before.st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
