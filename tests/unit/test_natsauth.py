"""The workers' answers to NATS's auth callout (bridge/natsauth.py): who may log in, with which
permissions, and answers that NATS can verify."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import nacl.signing
import pytest

from bridge import natsauth, natsconf
from bridge.natsauth import AuthRequest, AuthResponder, Issuer


def request(user: str, password: str, client_id: str, kind: str = "mqtt") -> bytes:
    """An authorization request as a node sends it (its signature is not checked by the responder)."""
    claims = {
        "aud": "nats-authorization-request",
        "iss": "NSERVER",
        "sub": "AISSUER",
        "nats": {
            "server_id": {"name": "n1", "id": "NSERVERID", "version": "2.15.1"},
            "user_nkey": "UCLIENTNKEY",
            "client_info": {"host": "127.0.0.1", "id": 7, "user": user, "type": kind, "mqtt_id": client_id},
            "connect_opts": {"user": user, "pass": password, "protocol": 0},
            "type": "authorization_request",
            "version": 2,
        },
    }
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJ0eXAiOiJKV1QifQ.{body}.c2ln".encode()


def verified(token: str, public_key: str) -> dict:
    """The claims of a JWT whose ed25519 signature checks out against an nkey's public key."""
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))[1:33]
    head, body, sig = token.split(".")
    nacl.signing.VerifyKey(raw).verify(f"{head}.{body}".encode(), natsauth._unb64(sig))
    return natsauth.claims_of(token)


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {u: natsconf.bcrypt_hash(f"{u}-pw") for u in ("alice", "bob", "chat-bridge", "chat-observer")}


@pytest.fixture
def responder(tmp_path: Path, hashes: dict[str, str]) -> AuthResponder:
    users = tmp_path / "users.conf"
    users.write_text(natsconf.users_conf(hashes))
    seed, _ = natsauth.new_issuer()
    return AuthResponder(Issuer(seed), users, clock=lambda: 1_800_000_000)


def decide(responder: AuthResponder, data: bytes) -> str | None:
    return asyncio.run(responder.decide(AuthRequest.parse(data)))


def test_a_user_with_its_password_and_its_own_client_id_gets_in(responder: AuthResponder) -> None:
    assert decide(responder, request("alice", "alice-pw", "alice")) is None
    assert decide(responder, request("alice", "alice-pw", "alice:phone")) is None


@pytest.mark.parametrize(
    ("user", "password", "client_id", "kind", "reason"),
    [
        ("alice", "alice-pw", "bob:phone", "mqtt", "client id rule"),  # another user's session
        ("alice", "alice-pw", "bob", "mqtt", "client id rule"),
        ("alice", "alice-pw", "alice:", "mqtt", "client id rule"),
        ("alice", "alice-pw", "", "mqtt", "client id rule"),
        ("alice", "alice-pw", "alice:a/b", "mqtt", "client id rule"),
        ("alice", "bob-pw", "alice", "mqtt", "wrong password"),
        ("alice", "", "alice", "mqtt", "wrong password"),
        ("mallory", "x", "mallory", "mqtt", "no account"),
        ("", "", "x", "mqtt", "no account"),
        ("chat-bridge", "chat-bridge-pw", "chat-bridge", "mqtt", "no account"),  # only as auth user
        ("alice", "alice-pw", "", "nats", "only MQTT"),  # the NATS protocol: no chat user's
    ],
)
def test_refusals_say_why(
    responder: AuthResponder, user: str, password: str, client_id: str, kind: str, reason: str
) -> None:
    why = decide(responder, request(user, password, client_id, kind))
    assert why is not None and reason in why


def test_the_answer_is_signed_by_the_issuer_and_carries_the_accounts_permissions(
    responder: AuthResponder,
) -> None:
    req = AuthRequest.parse(request("alice", "alice-pw", "alice:phone"))
    answer = verified(responder.answer(req, None), responder.issuer.public_key)
    assert answer["aud"] == "NSERVERID" and answer["sub"] == "UCLIENTNKEY"
    assert answer["iss"] == responder.issuer.public_key
    assert answer["nats"]["type"] == "authorization_response" and "error" not in answer["nats"]
    user = verified(answer["nats"]["jwt"], responder.issuer.public_key)
    assert user["aud"] == "CHAT" and user["sub"] == "UCLIENTNKEY" and user["name"] == "alice"
    pub, sub = natsconf.permissions("alice")
    assert user["nats"]["pub"] == {"allow": pub} and user["nats"]["sub"] == {"allow": sub}
    assert "cmd.*.alice.*" in pub and "chat.v1.users.alice.inbox" in sub
    assert not any("bob" in s for s in pub + sub)
    assert user["nats"]["allowed_connection_types"] == ["MQTT", "MQTT_WS"]
    assert user["nats"]["subs"] == user["nats"]["data"] == user["nats"]["payload"] == -1


def test_a_refusal_is_a_signed_error_without_a_jwt(responder: AuthResponder) -> None:
    req = AuthRequest.parse(request("alice", "alice-pw", "bob:phone"))
    answer = verified(responder.answer(req, "no"), responder.issuer.public_key)
    assert answer["nats"]["error"] == "no" and "jwt" not in answer["nats"]


def test_an_observer_may_publish_nothing(responder: AuthResponder) -> None:
    assert decide(responder, request("chat-observer", "chat-observer-pw", "chat-observer:1")) is None
    user = natsauth.claims_of(responder.user_jwt(AuthRequest.parse(request("chat-observer", "", ""))))
    assert user["nats"]["pub"] == {"deny": [">"]}


def test_accounts_added_and_removed_count_at_the_next_login(
    responder: AuthResponder, hashes: dict[str, str]
) -> None:
    assert decide(responder, request("carol", "carol-pw", "carol")) is not None
    responder.users_path.write_text(
        natsconf.users_conf({**hashes, "carol": natsconf.bcrypt_hash("carol-pw")})
    )
    assert decide(responder, request("carol", "carol-pw", "carol")) is None
    responder.users_path.write_text(natsconf.users_conf({"bob": hashes["bob"]}))
    why = decide(responder, request("carol", "carol-pw", "carol"))  # remembered password, gone account
    assert why is not None and "no account" in why


def test_a_changed_password_no_longer_matches_the_remembered_one(
    responder: AuthResponder, hashes: dict[str, str]
) -> None:
    assert decide(responder, request("alice", "alice-pw", "alice")) is None
    responder.users_path.write_text(
        natsconf.users_conf({**hashes, "alice": natsconf.bcrypt_hash("new-pw-22")})
    )
    assert decide(responder, request("alice", "alice-pw", "alice")) == "alice: wrong password"
    assert decide(responder, request("alice", "new-pw-22", "alice")) is None


@pytest.mark.parametrize(
    "data", [b"", b"not a jwt", b"a.b.c", b"a." + base64.urlsafe_b64encode(b'{"nats": 1}') + b".c"]
)
def test_a_malformed_request_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        AuthRequest.parse(data)


def test_an_issuer_must_be_an_account_seed(tmp_path: Path) -> None:
    import os

    import nkeys

    with pytest.raises(ValueError, match="account"):
        Issuer(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())
    with pytest.raises(ValueError, match="seed"):
        Issuer("SAnotaseed")
    seed_file = tmp_path / "auth.seed"
    public = natsauth.write_issuer(seed_file)
    assert public.startswith("A") and oct(seed_file.stat().st_mode & 0o777) == "0o600"
    assert natsauth.write_issuer(seed_file) == public  # an existing seed is kept
    assert f"issuer: {public}" in natsconf.auth_conf(public)
