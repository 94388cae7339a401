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
import tempfile
from pathlib import Path

ITERATIONS = 101  # mosquitto_passwd's default; every client connect pays for it


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
    """Replaces the file atomically, readable by its owner only (Mosquitto warns otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{user}:{stored}\n" for user, stored in entries.items())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
