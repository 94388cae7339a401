"""MQTT over WebSockets in the embedded broker (`serve --ws-listen`, path /mqtt): the same accounts,
client id rule, topic rules, throttle and wills as over TCP, and what the listener does with garbage,
plain HTTP, silent connections and a taken port."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets.sync.client
from chatclient import ChatClient
from conftest import ACCOUNTS, EmbeddedBroker, free_port, running_bridge, write_accounts
from test_cli import serve_cmd, serving, wait_for_line
from test_embedded_attacks import Raw, dm, round_trip

PREFIX = "chat/v1"


class Broker(EmbeddedBroker):
    """conftest's embedded broker, also serving WebSockets on a free port (`ws_port`)."""

    def __init__(self, security: object = None, **options: Any) -> None:
        self.ws_port = free_port()
        super().__init__(security, ws_listen=("127.0.0.1", self.ws_port), **options)


@contextmanager
def embedded(tmp_path: Path, *, accounts: bool = True) -> Iterator[Broker]:
    """The broker (with the accounts of ACCOUNTS unless told otherwise) and the bridge on it, events
    in-process, as `chat-bridge serve` runs them."""
    from bridge.broker import Security

    security = Security(write_accounts(tmp_path / "passwd"), "internal-secret") if accounts else None
    broker = Broker(security).start()
    try:
        with running_bridge(
            broker.port,
            f"sqlite:///{tmp_path / 'c.sqlite3'}",
            credentials=f"chat-bridge:{broker.secret}",
            publisher=broker.publisher(),
        ):
            yield broker
    finally:
        broker.stop()


def ws_user(name: str, broker: Broker, **kw: Any) -> ChatClient:
    return ChatClient(
        name,
        "127.0.0.1",
        broker.ws_port,
        username=name,
        password=ACCOUNTS.get(name),
        transport="websockets",
        **kw,
    ).start()


def tcp_user(name: str, broker: Broker, **kw: Any) -> ChatClient:
    return ChatClient(
        name, "127.0.0.1", broker.port, username=name, password=ACCOUNTS.get(name), **kw
    ).start()


def ws_raw(
    broker: Broker, client_id: str, username: str | None = None, password: str | None = None, **kw: Any
) -> Raw:
    return Raw(broker.ws_port, client_id, username, password, transport="websockets", **kw)


def test_a_websockets_client_chats_with_a_tcp_client_and_its_will_fires(tmp_path: Path) -> None:
    with embedded(tmp_path) as broker:
        alice = ws_user("alice", broker)
        bob = tcp_user("bob", broker)
        assert alice.connect_chat()["type"] == "connected"
        bob.connect_chat()
        cid = dm(alice, "bob")
        alice.request("send-message", conversation_id=cid, body="over websockets")
        assert bob.next_of("message-added")["data"]["message"]["body"] == "over websockets"
        bob.request("send-message", conversation_id=cid, body="over tcp")
        got = alice.next_of("message-added")["data"]["message"]
        assert (got["body"], got["sender_id"]) == ("over tcp", "bob")
        # alice's connection vanishes without DISCONNECT: the broker publishes her will
        alice.client.loop_stop()
        sock = alice.client.socket()
        assert sock is not None
        sock.close()
        gone = bob.wait_for(lambda e: e["type"] == "user-disconnected", timeout=15)
        assert gone["data"] == {"user_id": "alice"}
        assert [u["user_id"] for u in bob.request("get-active-users")["data"]["users"]] == ["bob"]
        bob.stop()


def test_websockets_refuses_the_connections_tcp_refuses(tmp_path: Path) -> None:
    """Wrong password, no account, another account's client id, the bridge's client id, a will on
    another user's topic: refused before any session work, as over TCP."""
    with embedded(tmp_path) as broker:
        bob = ws_user("bob", broker, client_id="bob:phone")
        bob.connect_chat()
        attempts = {
            "wrong password": ws_raw(broker, "bob:x", "bob", "not-bobs-password"),
            "anonymous": ws_raw(broker, "bob:y"),
            "another account's client id": ws_raw(broker, "bob:phone", "mallory", ACCOUNTS["mallory"]),
            "the bridge's client id": ws_raw(broker, "chat-bridge", "mallory", ACCOUNTS["mallory"]),
            "a will as bob": ws_raw(
                broker,
                "mallory:w",
                "mallory",
                ACCOUNTS["mallory"],
                will=(f"{PREFIX}/users/bob/commands/disconnect", b"{}", False),
            ),
        }
        codes = {why: (raw.refused, str(raw.rc)) for why, raw in attempts.items()}  # CONNACK 5 and 2
        assert codes == {
            "wrong password": (True, "Not authorized"),
            "anonymous": (True, "Not authorized"),
            "another account's client id": (True, "Client identifier not valid"),
            "the bridge's client id": (True, "Not authorized"),
            "a will as bob": (True, "Not authorized"),
        }
        for raw in attempts.values():
            raw.stop()
        # bob's session was not touched by the attempt on his client id
        assert bob.request("get-active-users")["type"] == "active-users"
        bob.stop()


def test_over_websockets_nobody_acts_as_or_reads_another_user(tmp_path: Path) -> None:
    with embedded(tmp_path) as broker:
        alice = tcp_user("alice", broker)
        alice.connect_chat()
        bob = tcp_user("bob", broker)
        bob.connect_chat()
        cid = dm(alice, "bob")
        mallory = ws_raw(
            broker, "mallory:ws", "mallory", ACCOUNTS["mallory"], subscribe=(f"{PREFIX}/users/bob/inbox",)
        )
        assert not mallory.refused
        assert mallory.subscribed.wait(10)
        forged = orjson.dumps({"request_id": "forged", "conversation_id": cid, "body": "from bob?"})
        mallory.publish(f"{PREFIX}/users/bob/commands/send-message", forged)
        alice.request("send-message", conversation_id=cid, body="for bob only")
        assert bob.next_of("message-added")["data"]["message"]["body"] == "for bob only"
        round_trip(bob)  # mallory's forged command, had it been taken, was handled before this
        history = alice.request("get-messages", conversation_id=cid, since_seq=0)["data"]["messages"]
        assert [m["body"] for m in history] == ["for bob only"]
        mallory.stop()
        assert mallory.got == []  # bob's inbox never reached her
        alice.stop()
        bob.stop()


def test_password_guessing_over_websockets_is_throttled_per_peer_address(tmp_path: Path) -> None:
    with embedded(tmp_path) as broker:
        guesses = [ws_raw(broker, "bob:g", "bob", f"guess-{i}") for i in range(12)]
        assert all(g.refused for g in guesses)
        # the peer's own address was counted (not a placeholder shared by every WebSocket client)
        assert set(broker.broker.failed_logins._left) == {"127.0.0.1"}
        # from that address even the right password is not checked now, over either listener
        right_ws = ws_raw(broker, "bob:ok", "bob", ACCOUNTS["bob"])
        right_tcp = Raw(broker.port, "bob:ok2", "bob", ACCOUNTS["bob"])
        assert right_ws.refused and right_tcp.refused
        for c in (*guesses, right_ws, right_tcp):
            c.stop()


def test_an_oversized_command_over_websockets_is_refused_as_over_tcp(tmp_path: Path) -> None:
    with embedded(tmp_path) as broker:
        over_ws = ws_user("alice", broker)
        over_tcp = tcp_user("bob", broker)
        big = b'{"request_id": "big", "conversation_id": "global", "body": "' + b"x" * 70_000 + b'"}'
        answers = []
        for client in (over_ws, over_tcp):
            client.connect_chat()
            client.publish_raw("send-message", big)
            answers.append(client.next_of("error")["data"]["code"])  # (not parsed: no request_id)
        assert answers == ["payload-too-large", "payload-too-large"]
        assert over_ws.request("get-active-users")["type"] == "active-users"
        over_ws.stop()
        over_tcp.stop()


@pytest.mark.parametrize("transport", ["websockets", "tcp"])
def test_a_packet_over_the_limit_closes_its_connection_over_both_listeners(
    tmp_path: Path, transport: str
) -> None:
    """As the shipped Mosquitto (max_packet_size 128 KiB): the sender's connection is closed, its will
    fires, nobody else notices. amqtt alone read and kept packets of up to 256 MB."""
    with embedded(tmp_path) as broker:
        bob = tcp_user("bob", broker)
        bob.connect_chat()
        alice = (ws_user if transport == "websockets" else tcp_user)("alice", broker)
        alice.connect_chat()
        lost = threading.Event()
        alice.client.on_disconnect = lambda *_a: lost.set()
        alice.client.reconnect_delay_set(30, 60)
        alice.client.publish(alice.topic("send-message"), b"x" * 200_000, qos=1)
        gone = bob.wait_for(lambda e: e["type"] == "user-disconnected", timeout=15)
        assert gone["data"] == {"user_id": "alice"}
        assert lost.wait(15)  # the broker closed alice's connection
        bob.request("send-message", conversation_id="global", body="unharmed")
        alice.client.loop_stop()
        bob.stop()


def http_exchange(port: int, request: bytes) -> bytes:
    """What the server answers to these raw bytes before it closes (b"" when it says nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes `sock` within `seconds` (reading and dropping what it sends)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_garbage_plain_http_and_silence_on_the_websockets_port_hurt_nobody(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with embedded(tmp_path) as broker:
        broker.broker.connect_timeout = 1.0  # (10 s in production)
        alice = ws_user("alice", broker)
        bob = tcp_user("bob", broker)
        alice.connect_chat()
        bob.connect_chat()
        key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        upgrade = b"Connection: Upgrade\r\nUpgrade: websocket\r\n" + key
        assert http_exchange(broker.ws_port, os.urandom(3000)).split(b" ")[1:2] in ([b"400"], [])
        assert http_exchange(broker.ws_port, b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 426 "
        )
        other_path = b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Protocol: mqtt\r\n" + upgrade
        assert http_exchange(broker.ws_port, other_path + b"\r\n").startswith(b"HTTP/1.1 404 ")
        no_subprotocol = b"GET /mqtt HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n"
        assert http_exchange(broker.ws_port, no_subprotocol).startswith(b"HTTP/1.1 400 ")
        # a WebSocket that sends junk instead of a CONNECT is closed
        url = f"ws://127.0.0.1:{broker.ws_port}/mqtt"
        with websockets.sync.client.connect(url, subprotocols=["mqtt"], open_timeout=10) as junk:
            junk.send(b"\x10\xff\xff\xff\x7fjunk" + os.urandom(200))
            with pytest.raises(websockets.ConnectionClosed):
                junk.recv(timeout=15)
        # a WebSocket (and a TCP connection) that never sends a CONNECT is closed after connect_timeout
        with (
            websockets.sync.client.connect(url, subprotocols=["mqtt"], open_timeout=10) as silent,
            pytest.raises(websockets.ConnectionClosed),
        ):
            silent.recv(timeout=15)
        with socket.create_connection(("127.0.0.1", broker.port)) as silent_tcp:
            assert closed_within(silent_tcp, 15)
        # and a handshake that never ends (slow loris) holds nothing the others need meanwhile
        with socket.create_connection(("127.0.0.1", broker.ws_port)) as loris:
            loris.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
            alice.request("send-message", conversation_id="global", body="still here")
            assert bob.next_of("message-added")["data"]["message"]["body"] == "still here"
        # each refused handshake is one warning line, no traceback
        handshakes = [r for r in caplog.records if r.name == "bridge.broker.websockets"]
        assert handshakes and all(r.levelname == "WARNING" and not r.exc_info for r in handshakes)
        assert any(
            "refused a WebSocket opening handshake: missing subprotocol" in r.getMessage() for r in handshakes
        )
        bob.request("send-message", conversation_id="global", body="me too")
        assert alice.wait_for(
            lambda e: e["type"] == "message-added" and e["data"]["message"]["body"] == "me too"
        )
        alice.stop()
        bob.stop()


def test_a_websocket_handshake_that_never_ends_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bridge.broker

    monkeypatch.setattr(bridge.broker, "WS_OPEN_TIMEOUT", 1.0)  # (10 s in production)
    broker = Broker().start()
    try:
        with socket.create_connection(("127.0.0.1", broker.ws_port)) as loris:
            loris.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            assert closed_within(loris, 6)  # (websockets' own default would take 10 s)
    finally:
        broker.stop()


# -- `chat-bridge serve` ----------------------------------------------------------------------------


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_serve_listens_where_ws_listen_says_and_nowhere_when_off(tmp_path: Path) -> None:
    from chat_bridge.testing import BridgeProcess

    with BridgeProcess(tmp_path / "on") as bridge:  # a free WebSockets port of its own
        assert bridge.ws_url == f"ws://127.0.0.1:{bridge.ws_port}/mqtt"
        assert f"and {bridge.ws_url}" in bridge.log()
        with bridge.client("alice", transport="websockets") as alice:
            with bridge.client("bob") as bob:  # over TCP
                conv = alice.create_direct("bob")
                alice.send_message(conv["conversation_id"], "hi over websockets")
                assert bob.wait_for("message-added").message["body"] == "hi over websockets"
            proc = bridge._proc
            assert proc is not None
            bridge.stop()  # with a WebSocket client still connected: a clean, prompt stop
            assert proc.returncode == 0, bridge.log()
    port, ws = free_port(), free_port()
    env = {"CHAT_BRIDGE_WS_LISTEN": f"127.0.0.1:{ws}"}  # the option wins over the environment
    with serving(tmp_path, "--listen", f"127.0.0.1:{port}", "--ws-listen", "off", env=env) as proc:
        wait_for_line(proc, "bridge online")
        assert refused(ws)


def test_ws_listen_is_read_from_the_environment_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.cli import parse_args, settings_from
    from bridge.config import ConfigError

    assert settings_from(parse_args(["serve", "--ws-listen", "127.0.0.1:9001"])).ws_address() == (
        "127.0.0.1",
        9001,
    )
    monkeypatch.setenv("CHAT_BRIDGE_WS_LISTEN", "0.0.0.0:9002")
    assert settings_from(parse_args(["serve"])).ws_address() == ("0.0.0.0", 9002)
    monkeypatch.setenv("CHAT_BRIDGE_WS_LISTEN", "OFF")
    assert settings_from(parse_args(["serve"])).ws_address() is None
    monkeypatch.delenv("CHAT_BRIDGE_WS_LISTEN")
    assert settings_from(parse_args(["serve"])).ws_address() == ("127.0.0.1", 9001)  # the default
    for args, error in (
        (["--ws-listen", "9001"], "--ws-listen takes host:port"),
        (["--listen", "127.0.0.1:1884", "--ws-listen", "127.0.0.1:1884"], "is also --listen's address"),
        (["--http-listen", "127.0.0.1:8081", "--ws-listen", "127.0.0.1:8081"], "is also --http-listen's"),
    ):
        with pytest.raises(ConfigError, match=error):
            settings_from(parse_args(["serve", *args]))


def test_a_taken_ws_port_stops_serve_naming_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = subprocess.run(
            serve_cmd("--listen", f"127.0.0.1:{free_port()}", "--ws-listen", f"127.0.0.1:{busy}"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert "--ws-listen" in result.stderr and "in use" in result.stderr
    assert not (tmp_path / "chat-bridge.sqlite3").exists()  # before the database was touched


def test_ws_listen_is_ignored_with_a_warning_when_an_external_broker_is_given(tmp_path: Path) -> None:
    broker = EmbeddedBroker().start()  # stands in for the external broker
    try:
        ws = free_port()
        url = f"mqtt://chat-bridge:{broker.secret}@127.0.0.1:{broker.port}"
        with serving(tmp_path, "--broker-url", url, "--ws-listen", f"127.0.0.1:{ws}") as proc:
            lines: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "bridge online" in line:
                    break
            assert any(f"--ws-listen 127.0.0.1:{ws} is ignored" in line for line in lines), lines
            assert refused(ws)
    finally:
        broker.stop()


def test_the_http_server_is_told_where_websockets_are(tmp_path: Path) -> None:
    from bridge.cli import Monitoring, parse_args, settings_from

    http, db = free_port(), f"sqlite:///{tmp_path / 'c.sqlite3'}"
    settings = settings_from(
        parse_args(
            [
                "serve",
                "--database-url",
                db,
                "--http-listen",
                f"127.0.0.1:{http}",
                "--ws-listen",
                "0.0.0.0:9123",
            ]
        )
    )
    monitoring = Monitoring(settings)
    try:
        assert monitoring.http is not None and monitoring.http.ws_address == ("0.0.0.0", 9123)
    finally:
        monitoring.stop()
    external = settings_from(
        parse_args(
            [
                "serve",
                "--database-url",
                db,
                "--broker-url",
                "mqtt://127.0.0.1:1",
                "--http-listen",
                f"127.0.0.1:{http}",
            ]
        )
    )
    monitoring = Monitoring(external)
    try:
        assert monitoring.http is not None and monitoring.http.ws_address is None
    finally:
        monitoring.stop()


def test_the_sdk_refuses_an_unknown_transport() -> None:
    from chat_bridge import Client

    with pytest.raises(ValueError, match="transport is 'tcp' or 'websockets'"):
        Client("alice", transport="websocket")


def handshake(port: int, headers: dict[str, str]) -> bytes:
    """The status line the WebSockets listener answers a `/mqtt` handshake with these headers."""
    lines = [
        "GET /mqtt HTTP/1.1",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: mqtt",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        return answer.split(b"\r\n")[0]


def test_pages_of_other_sites_cannot_use_the_websockets_listener(tmp_path: Path) -> None:
    """Without accounts, a page of any site open in the developer's browser could otherwise connect
    to ws://127.0.0.1:9001/mqtt and act as any user (a browser sends its page's Origin)."""
    with embedded(tmp_path, accounts=False) as broker:
        port = broker.ws_port
        here = f"127.0.0.1:{port}"
        for origin, host in (
            ("https://evil.example", here),
            ("http://evil.example:8080", "evil.example:" + str(port)),  # a rebound name
            ("null", here),  # a sandboxed frame or a file:// page
            ("http://127.0.0.2:8080", here),
        ):
            assert handshake(port, {"Host": host, "Origin": origin}).startswith(b"HTTP/1.1 403 "), origin
        for headers in (
            {"Host": here},  # no Origin: not a browser
            {"Host": here, "Origin": "http://127.0.0.1:8080"},  # the browser client of --http-listen
            {"Host": f"localhost:{port}", "Origin": "http://localhost:8080"},
        ):
            assert handshake(port, headers).startswith(b"HTTP/1.1 101 "), headers
        # a refused page got nothing, and an allowed client still chats
        alice = ws_user("alice", broker)
        alice.connect_chat()
        alice.stop()


def test_ws_origins_allows_the_pages_the_operator_names(tmp_path: Path) -> None:
    from bridge.cli import parse_args, settings_from
    from bridge.config import ConfigError

    broker = Broker(None, ws_origins=("https://chat.example.com",)).start()
    try:
        good = {"Host": "chat.example.com:9001", "Origin": "https://chat.example.com"}
        assert handshake(broker.ws_port, good).startswith(b"HTTP/1.1 101 ")
        bad = {"Host": "chat.example.com:9001", "Origin": "https://chat.example.com.evil.example"}
        assert handshake(broker.ws_port, bad).startswith(b"HTTP/1.1 403 ")
    finally:
        broker.stop()
    settings = settings_from(parse_args(["serve", "--ws-origins", " https://Chat.example.com/ ,http://a:8080"]))
    assert settings.ws_origins == ("https://chat.example.com", "http://a:8080")
    assert settings_from(parse_args(["serve", "--ws-origins", "*"])).ws_origins == ("*",)
    for value in ("chat.example.com", "ftp://a", "https://a/path", "https://a:99999"):
        with pytest.raises(ConfigError, match="--ws-origins takes origins"):
            settings_from(parse_args(["serve", "--ws-origins", value]))


def test_an_empty_websocket_message_then_a_close_stops_nobody(tmp_path: Path) -> None:
    """amqtt's reader spun for ever on a closed connection whose last message was empty: the broker
    and the bridge (same event loop) stood still, and no CONNECT got its CONNACK."""
    with embedded(tmp_path) as broker:
        url = f"ws://127.0.0.1:{broker.ws_port}/mqtt"
        for message in (b"", "", b"\x10"):  # empty binary, empty text, a packet's first byte only
            with websockets.sync.client.connect(url, subprotocols=["mqtt"], open_timeout=10) as ws:
                ws.send(message)
        alice = tcp_user("alice", broker)
        bob = ws_user("bob", broker)
        alice.connect_chat()
        bob.connect_chat()
        round_trip(alice)
        round_trip(bob)
        alice.stop()
        bob.stop()


def test_the_websocket_reader_returns_what_is_left_once_closed() -> None:
    import asyncio

    from bridge.broker import WebSocketReader

    class Socket:
        def __init__(self, messages: list[bytes | str]) -> None:
            self.messages = messages
            self.calls = 0

        async def recv(self) -> bytes | str:
            self.calls += 1
            if not self.messages:
                raise websockets.ConnectionClosed(None, None)
            return self.messages.pop(0)

    async def main() -> None:
        sock = Socket([b"ab", b"", "c"])
        reader = WebSocketReader(sock)
        assert await reader.read(1) == b"a"
        assert await reader.read(5) == b"bc"  # the rest, once closed; nothing replayed
        assert await reader.read(1) == b""
        assert sock.calls == 4  # not asked again after the close

    asyncio.run(asyncio.wait_for(main(), 5))
