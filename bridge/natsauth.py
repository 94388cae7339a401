"""The workers answer NATS's auth callout (NATS 2.10 and newer), so that the client id rule holds on
the cluster as it does on Mosquitto and the embedded broker.

NATS 2.9 checks the accounts of `users.conf` itself and lets any account use any MQTT client id:
an account that connects with another user's client id takes that user's MQTT session over. From
2.10 on, a node can ask a service instead (`authorization { auth_callout { ... } }` in `auth.conf`,
`auth_conf` below): for every connection but the workers' own account it sends an authorization
request to `$SYS.REQ.USER.AUTH` in the chat account, with the username, the password and the MQTT
client id, and lets the client in only with a user JWT that comes back signed by the configured
issuer. Every worker answers (one queue group, so one answer per login):

- the account must be in `users.conf` (the same file `chat-bridge users add --nats-users` keeps,
  bcrypt hashes) and the password must match;
- the connection must be MQTT (or MQTT over WebSocket) and its client id must follow the client id
  rule (`user` or `user:suffix`, `topics.client_id_allowed`);
- the JWT carries the account's permissions, the same lists as the static `users.conf`
  (`natsconf.permissions`).

A refusal is an error in the signed answer: NATS logs it and the client gets CONNACK "not
authorized". With no worker running, nobody but the workers can log in (NATS waits for an answer,
then refuses). The issuer is an account nkey: `chat-bridge nats-auth SEED_FILE` makes one and prints
the `auth.conf` that names its public key; the workers sign with its seed (`--nats-auth-seed`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .natsconf import BRIDGE_ACCOUNT, CHAT_ACCOUNT, permissions, read_users
from .topics import client_id_allowed

log = logging.getLogger(__name__)

SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "chat-bridge-auth"
CONNECTION_TYPES = ["MQTT", "MQTT_WS"]
MAX_PENDING = 64  # password checks waiting for the hasher; past it a login is refused at once


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_issuer() -> tuple[str, str]:
    """A new account nkey: (seed, public key)."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()
    return seed, Issuer(seed).public_key


def write_issuer(path: Path) -> str:
    """The public key of the issuer whose seed is in `path`; a new one is made (mode 600) if the
    file does not exist."""
    if not path.exists():
        seed, _ = new_issuer()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(seed + "\n")
    return Issuer.from_file(path).public_key


class Issuer:
    """Signs JWTs with an account nkey (the auth callout's issuer)."""

    def __init__(self, seed: str) -> None:
        import nkeys

        try:
            self._keys = nkeys.from_seed(seed.strip().encode())
            self.public_key: str = self._keys.public_key.decode()
        except Exception as exc:  # nkeys raises its own errors, and binascii's
            raise ValueError(f"not an nkey seed ({exc.__class__.__name__})") from None
        if not self.public_key.startswith("A"):
            raise ValueError("the issuer must be an account nkey (its seed starts with SA)")

    @classmethod
    def from_file(cls, path: Path) -> Issuer:
        return cls(path.read_text())

    def sign(self, claims: dict[str, Any]) -> str:
        header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = self._keys.sign(f"{header}.{body}".encode())
        return f"{header}.{body}.{_b64(signature)}"


def claims_of(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the tests and the responder read requests with it)."""
    try:
        claims = json.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError) as exc:
        raise ValueError(f"not a JWT ({exc.__class__.__name__})") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JWT (its claims are not an object)")
    return claims


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """What a node asks about one connection."""

    server_id: str
    user_nkey: str
    user: str
    password: str
    kind: str  # the connection's type: mqtt (MQTT over WebSocket too), nats, websocket, leafnode
    client_id: str  # the MQTT client id; "" for other connections
    host: str

    @classmethod
    def parse(cls, data: bytes) -> AuthRequest:
        try:
            claims = claims_of(data.decode())
            nats = claims["nats"]
            if nats.get("type") != "authorization_request":
                raise ValueError(f"not an authorization request ({nats.get('type')!r})")
            info, opts = nats.get("client_info") or {}, nats.get("connect_opts") or {}
            return cls(
                server_id=str(nats["server_id"]["id"]),
                user_nkey=str(nats["user_nkey"]),
                user=str(opts.get("user") or ""),
                password=str(opts.get("pass") or ""),
                kind=str(info.get("type") or ""),
                client_id=str(info.get("mqtt_id") or ""),
                host=str(info.get("host") or ""),
            )
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed authorization request ({exc.__class__.__name__}: {exc})") from None


def refusal(request: AuthRequest, accounts: dict[str, str]) -> str | None:
    """Why a connection is refused before its password is checked; None if it may try."""
    if request.user not in accounts or request.user == BRIDGE_ACCOUNT:
        return f"no account {request.user!r}"
    if request.kind != "mqtt":
        return f"{request.user}: only MQTT connections, not {request.kind or 'unknown'}"
    if not client_id_allowed(request.user, request.client_id):
        return (
            f"{request.user}: client id {request.client_id!r} is not {request.user!r} "
            f"or {request.user}:<suffix> (the client id rule)"
        )
    return None


class AuthResponder:
    """Answers the nodes' authorization requests on a worker's NATS connection."""

    def __init__(
        self,
        issuer: Issuer,
        users_path: Path,
        *,
        topic_prefix: str = "chat/v1",
        account: str = CHAT_ACCOUNT,
        clock: Callable[[], float] = time.time,
        on_decision: Callable[[str], None] | None = None,
    ) -> None:
        self.issuer = issuer
        self.users_path = users_path
        self.topic_prefix = topic_prefix
        self.account = account
        self._clock = clock
        self._on_decision = on_decision or (lambda outcome: None)
        self._accounts: dict[str, str] = {}
        self._read_at: tuple[float, int] | None = None  # users.conf's (mtime, size) when read
        # bcrypt is slow on purpose (cost 11: a fifth of a second): two threads, and passwords that
        # matched are remembered (by their SHA-256 and the hash they matched) so that a reconnect
        # costs nothing. A changed password has another hash, so its old entry no longer matches.
        self._hasher = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="nats-auth")
        self._matched: OrderedDict[tuple[str, str, bytes], None] = OrderedDict()
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None

    async def start(self, nc: Any) -> None:
        self.accounts()  # a users.conf that cannot be read fails the start, not every login
        self._sub = await nc.subscribe(SUBJECT, queue=QUEUE, cb=self._on_message)
        await nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection may be closed already
                log.debug("auth callout: unsubscribe failed", exc_info=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._hasher.shutdown(wait=False, cancel_futures=True)

    async def _on_message(self, msg: Any) -> None:
        # nats-py runs one subscription's callbacks one after another: a password check must not
        # hold up the logins behind it.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        try:
            request = AuthRequest.parse(msg.data)
        except ValueError as exc:
            log.warning("auth callout: %s; not answered", exc)
            self._on_decision("malformed")
            return
        error = await self.decide(request)
        if error is None:
            self._on_decision("accepted")
        else:
            log.info("auth callout: refused %s from %s: %s", request.user or "?", request.host, error)
        await msg.respond(self.answer(request, error).encode())

    def accounts(self) -> dict[str, str]:
        """users.conf's accounts, read again when the file changes."""
        st = self.users_path.stat()
        if self._read_at != (st.st_mtime, st.st_size):
            self._accounts = read_users(self.users_path)
            self._read_at = (st.st_mtime, st.st_size)
        return self._accounts

    async def decide(self, request: AuthRequest) -> str | None:
        """None to let the connection in, else why not."""
        try:
            accounts = self.accounts()
        except OSError as exc:
            self._on_decision("error")
            return f"the accounts cannot be read ({exc.__class__.__name__})"
        why = refusal(request, accounts)
        if why is not None:
            self._on_decision("client_id" if "client id rule" in why else "account")
            return why
        hashed = accounts[request.user]
        key = (request.user, hashed, hashlib.sha256(request.password.encode()).digest())
        if key in self._matched:
            self._matched.move_to_end(key)
            return None
        if self._pending >= MAX_PENDING:
            self._on_decision("busy")
            return "too many logins at once; try again"
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._hasher, _password_matches, request.password, hashed)
        finally:
            self._pending -= 1
        if not ok:
            self._on_decision("password")
            return f"{request.user}: wrong password"
        self._matched[key] = None
        if len(self._matched) > 10_000:
            self._matched.popitem(last=False)
        return None

    def _sign(self, claims: dict[str, Any]) -> str:
        """A JWT of these claims, with an id, the time and the issuer added."""
        return self.issuer.sign(
            {
                "jti": _b64(secrets.token_bytes(16)),
                "iat": int(self._clock()),
                "iss": self.issuer.public_key,
                **claims,
            }
        )

    def user_jwt(self, request: AuthRequest) -> str:
        pub, sub = permissions(request.user, self.topic_prefix)
        return self._sign(
            {
                "name": request.user,
                "sub": request.user_nkey,
                "aud": self.account,  # without operators, the account the user is placed in
                "nats": {
                    "pub": {"allow": pub} if pub else {"deny": [">"]},
                    "sub": {"allow": sub},
                    "subs": -1,
                    "data": -1,
                    "payload": -1,
                    "allowed_connection_types": CONNECTION_TYPES,
                    "type": "user",
                    "version": 2,
                },
            }
        )

    def answer(self, request: AuthRequest, error: str | None) -> str:
        """The signed authorization response: a user JWT, or the error."""
        body: dict[str, Any] = {"error": error} if error is not None else {"jwt": self.user_jwt(request)}
        return self._sign(
            {
                "sub": request.user_nkey,
                "aud": request.server_id,
                "nats": {**body, "type": "authorization_response", "version": 2},
            }
        )


def _password_matches(password: str, hashed: str) -> bool:
    import bcrypt

    try:
        return bool(bcrypt.checkpw(password.encode(), hashed.encode()))
    except ValueError:  # not a bcrypt hash
        return False
