"""`chat-bridge users` and the password file: hash strength, password length, ids unique regardless
of case, and rewrites that keep the file's owner and mode (Mosquitto, running as its owner, must
still read it after `users add`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bridge import passwords
from bridge.cli import main


def add(path: Path, tmp_path: Path, name: str, password: str = "a-long-password") -> int:
    db = f"sqlite:///{tmp_path / 'users.sqlite3'}"
    return main(
        ["users", "add", name, "--password", password, "--password-file", str(path), "--database-url", db]
    )


def test_new_hashes_use_enough_pbkdf2_rounds_and_old_ones_still_verify() -> None:
    stored = passwords.hash_password("correct horse")
    assert stored.startswith("$7$10000$")
    assert passwords.verify("correct horse", stored)
    assert not passwords.verify("correct horsE", stored)
    assert passwords.verify("pw", passwords.hash_password("pw", iterations=101))  # mosquitto_passwd's


def test_short_passwords_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "passwd"
    assert add(path, tmp_path, "bob", "x") == 2
    assert add(path, tmp_path, "bob", "123456789") == 2
    assert "at least 10 characters" in capsys.readouterr().err
    assert not path.exists()
    assert add(path, tmp_path, "bob", "1234567890") == 0
    assert list(passwords.read(path)) == ["bob"]


def test_user_ids_are_unique_regardless_of_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "passwd"
    assert add(path, tmp_path, "alice") == 0
    for clash in ("ALICE", "Alice", "alicE"):
        assert add(path, tmp_path, clash) == 2
    assert "only in case" in capsys.readouterr().err
    assert add(path, tmp_path, "alice", "another-password") == 0  # her own password changes
    assert list(passwords.read(path)) == ["alice"]


def test_rewrites_keep_the_files_owner_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    passwords.write(path, {"chat-bridge": passwords.hash_password("bridge-password")})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a new file: its owner only
    os.chmod(path, 0o640)
    owner = (os.geteuid(), os.getegid())
    if os.geteuid() == 0:
        owner = (12345, 23456)  # as Mosquitto's own account would own it
        os.chown(path, *owner)
    assert add(path, tmp_path, "alice") == 0
    assert main(["users", "remove", "alice", "--password-file", str(path)]) == 0
    assert add(path, tmp_path, "bob") == 0
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, *owner)
    assert list(passwords.read(path)) == ["chat-bridge", "bob"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".passwd")] == []
