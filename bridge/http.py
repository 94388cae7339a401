"""The bridge's HTTP server (`--http-listen`): `/healthz`, `/metrics`, and the browser client at `/`
with its `/config.json` (where the page finds the broker's WebSocket listener).

An asyncio server on an event loop of its own, in a thread of its own: it never touches the bridge's
worker or the broker's event loop, so /healthz still answers (503) when that loop is stuck. A
connection costs no thread, and nobody can hold one for long: a request's line and headers must
arrive within `REQUEST_TIMEOUT` seconds (from the connection's start or the previous response) and
fit in `MAX_HEAD` bytes, a response must be taken within `WRITE_TIMEOUT`; at most `MAX_CONNECTIONS`
are open, `MAX_PER_ADDRESS` from one address (IPv6: its /64), and a new one beyond either closes the
least recently active one (of that address, or of all), so the monitor's fresh request gets through
a crowd of idle ones. `/healthz` and `/metrics` run on `WORKERS` threads (they may wait for the
database probe). Only GET and HEAD, without a body.

Static files come from bridge/web/ only (no directory listings, no hidden files, nothing outside
it), each with its content type, an ETag and a Content-Security-Policy that allows no inline script
or style.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import hashlib
import ipaddress
import json
import logging
import re
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .limits import OncePer
from .metrics import Health, Metrics
from .netaddr import address_key

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent / "web"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

REQUEST_TIMEOUT = 10.0  # seconds for a request's line and headers (after connecting or a response)
WRITE_TIMEOUT = 30.0  # seconds for a client to take one response
MAX_HEAD = 16_384  # bytes of a request's line and headers
MAX_HEADERS = 100
MAX_CONNECTIONS = 512  # open at once; a new one beyond closes the least recently active
MAX_PER_ADDRESS = 64  # open from one address (IPv6: its /64), likewise
WORKERS = 4  # threads for /healthz and /metrics
CHUNK = 65_536  # bytes written before waiting for the client to take them

# The types of what bridge/web/ holds, independent of the host's mime.types; anything else is bytes.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
}

# Scripts and styles from this server only (no inline code); the page talks MQTT over WebSockets to
# a broker that may listen on another port or host, hence ws: and wss: in connect-src; MQTT.js keeps
# its keepalive timers in a worker it makes from a blob (timers of background tabs are throttled).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; worker-src 'self' blob:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

# A Host header's hostname, as the page's WebSocket URL may carry it: a DNS name, IPv4, or [IPv6].
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]")


class HttpServerError(Exception):
    """The HTTP server could not start (its port is taken, the address is not this host's)."""


@dataclass(frozen=True)
class WebConfig:
    """What `/config.json` tells the browser client besides the broker's WebSocket address."""

    prefix: str = "chat/v1"
    # whether the broker wants passwords: True/False for the embedded broker, None for an external
    # one (the page then offers the password field)
    accounts: bool | None = None
    ws_path: str = "/mqtt"


def _hostname(host_header: str | None, fallback: str) -> str:
    """The hostname of a Host header (`example.org:8080` -> `example.org`, `[::1]:80` -> `[::1]`), or
    `fallback` when it is missing or not a plain hostname."""
    value = (host_header or "").strip()
    if value.startswith("["):
        name = value[: value.find("]") + 1] if "]" in value else ""
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name if name and _HOSTNAME.fullmatch(name) else fallback


def _host_name(host_header: str) -> str:
    """The name part of a Host header, lower case, without its port and trailing dot
    (`Example.org.:8080` -> `example.org`, `[::1]:80` -> `[::1]`)."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".") if name != "." else name


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which Host headers the server answers (against DNS rebinding: a page of another site whose
    name the attacker points at this machine makes the browser send that name as Host).

    Answered: an IP address (a browser sends one only when its user typed it; a rebound name is
    never an IP), `localhost` and its subdomains (browsers resolve them to loopback themselves),
    the names given (`--http-hosts`, `*` for any), and a request without Host (not a browser's).
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.any = "*" in names
        self.names = frozenset(_host_name(n) for n in names if n.strip() and n.strip() != "*")

    def allows(self, host_header: str | None) -> bool:
        if self.any or host_header is None or not host_header.strip():
            return True
        name = _host_name(host_header)
        if name in self.names or name == "localhost" or name.endswith(".localhost"):
            return True
        return _is_ip_literal(name)


def _url_host(host: str) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


class _Bad(Exception):
    """A request answered with `status` and then the connection closed."""

    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass
class _Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _parse(head: bytes) -> _Request:
    """The request line and headers (`head` ends with the empty line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover (latin-1 decodes any byte)
        raise _Bad(HTTPStatus.BAD_REQUEST, "undecodable") from None
    lines = text.split("\r\n")[:-2]
    while lines and lines[0] == "":  # tolerated before a request line (RFC 9112, 2.2)
        lines.pop(0)
    if not lines:
        raise _Bad(HTTPStatus.BAD_REQUEST, "no request line")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise _Bad(HTTPStatus.BAD_REQUEST, "bad request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Bad(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"version {version[:20]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise _Bad(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _Bad(HTTPStatus.BAD_REQUEST, "bad header line")
        name = name.lower()
        if name in headers and name in ("host", "content-length", "transfer-encoding"):
            raise _Bad(HTTPStatus.BAD_REQUEST, f"two {name} headers")
        headers[name] = value.strip() if name not in headers else f"{headers[name]}, {value.strip()}"
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise _Bad(HTTPStatus.BAD_REQUEST, "a request with a body")
    if method not in ("GET", "HEAD"):
        raise _Bad(HTTPStatus.NOT_IMPLEMENTED, f"method {method[:20]!r}")
    return _Request(method, target, version, headers)


class _Connection:
    __slots__ = ("address", "writer")

    def __init__(self, address: str, writer: asyncio.StreamWriter) -> None:
        self.address, self.writer = address, writer

    def close(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


class _Connections:
    """The open connections, least recently active first, overall and per address: admitting one
    beyond a cap closes the least recently active one there. O(1) each."""

    def __init__(self) -> None:
        self.all: OrderedDict[_Connection, None] = OrderedDict()
        self.by_address: dict[str, OrderedDict[_Connection, None]] = {}
        self.evicted = 0

    def admit(self, conn: _Connection, max_total: int, max_per_address: int) -> None:
        mine = self.by_address.setdefault(conn.address, OrderedDict())
        while len(mine) >= max_per_address:
            self._evict(next(iter(mine)))
        while len(self.all) >= max_total:
            self._evict(next(iter(self.all)))
        self.all[conn] = None
        mine[conn] = None

    def touch(self, conn: _Connection) -> None:
        if conn in self.all:
            self.all.move_to_end(conn)
            self.by_address[conn.address].move_to_end(conn)

    def forget(self, conn: _Connection) -> None:
        if self.all.pop(conn, 0) is None:
            mine = self.by_address[conn.address]
            del mine[conn]
            if not mine:
                del self.by_address[conn.address]

    def _evict(self, conn: _Connection) -> None:
        self.forget(conn)
        conn.close()
        self.evicted += 1


class HttpServer:
    """Binds at construction (so that a taken port fails before anything else starts), serves after
    `start()` until `stop()`.

    `ws_address` is the (host, port) of the broker's MQTT-over-WebSockets listener that the page at
    `/` connects to (path `web.ws_path`); it may also be set after construction, once that listener
    is bound. None (an external broker, or no WebSockets listener): the page asks for the URL.
    """

    def __init__(
        self,
        host: str,
        port: int,
        health: Health,
        metrics: Metrics,
        *,
        web_root: Path = WEB_ROOT,
        web: WebConfig | None = None,
        ws_address: tuple[str, int] | None = None,
        hosts: tuple[str, ...] = (),
    ) -> None:
        self.health = health
        self.hosts = HostCheck(hosts)
        self._misdirected = OncePer(60_000)
        self.metrics = metrics
        self.web_root = web_root.resolve()
        self.web = web or WebConfig()
        self.ws_address = ws_address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise HttpServerError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self._connections = _Connections()
        self._files: dict[Path, tuple[int, int, bytes, str]] = {}  # path -> mtime, size, body, etag
        self._workers = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="http-health")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)
        host, port = self.address
        log.info("HTTP on http://%s:%d/ (the browser client; /healthz, /metrics)", _url_host(host), port)

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
        self._sock.close()
        self._workers.shutdown(wait=False, cancel_futures=True)

    # -- the event loop ----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._serve, sock=self._sock, limit=MAX_HEAD)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for conn in list(self._connections.all):
                conn.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        conn = _Connection(address_key(str(peer[0])), writer)
        self._connections.admit(conn, MAX_CONNECTIONS, MAX_PER_ADDRESS)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._respond(
                        writer, *_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), close=True
                    )
                    return
                try:
                    request = _parse(head)
                except _Bad as bad:
                    log.debug("%s: %s", peer[0], bad)
                    await self._respond(writer, *_error(bad.status), close=True)
                    return
                status, headers, body = await self._answer(request)
                keep = request.keep_alive
                log.debug("%s %s %s %d", peer[0], request.method, request.path[:200], status)
                if not await self._respond(
                    writer, status, headers, b"" if request.method == "HEAD" else body, close=not keep
                ):
                    return
                if not keep:
                    return
                self._connections.touch(conn)
        except Exception:  # one request must never take the server down
            log.exception("HTTP request from %s failed", peer[0])
        finally:
            self._connections.forget(conn)
            conn.close()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        close: bool,
    ) -> bool:
        """Writes a response within WRITE_TIMEOUT; False when the client did not take it."""
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", "Server: chat-bridge"]
        lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
        lines += [f"{name}: {value}" for name, value in headers]
        if close:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        async def write() -> None:
            writer.write(data)
            view = memoryview(body)
            for at in range(0, len(view), CHUNK):
                await writer.drain()
                writer.write(view[at : at + CHUNK])
            await writer.drain()

        try:
            await asyncio.wait_for(write(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError):
            return False
        return True

    # -- what is served ----------------------------------------------------------------------

    async def _answer(self, request: _Request) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        host = request.headers.get("host")
        if not self.hosts.allows(host):
            return self._misdirected_reply(str(host))
        path = urlsplit(request.path).path
        loop = asyncio.get_running_loop()
        if path == "/healthz":
            healthy, report = await loop.run_in_executor(self._workers, self.health.report)
            status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
            return _reply(status, "application/json", json.dumps(report).encode() + b"\n")
        if path == "/metrics":
            body = await loop.run_in_executor(self._workers, self._metrics)
            return _reply(HTTPStatus.OK, PROMETHEUS_TEXT, body)
        if path == "/config.json":
            return _reply(HTTPStatus.OK, "application/json", self._config(request.headers.get("host")))
        return self._static(path, request.headers.get("if-none-match") or "")

    def _misdirected_reply(self, host: str) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        name = _host_name(host)[:100]
        if self._misdirected.due(name, int(self._loop.time() * 1000) if self._loop else 0):
            log.warning(
                "HTTP: refused a request for host %r (421; at most one such warning a minute per host): "
                "name it in --http-hosts if this server is reached by that name",
                name,
            )
        body = (
            f"421 Misdirected Request: this server does not answer for the host {name!r}. "
            "It answers for IP addresses, localhost and the names its operator gave with --http-hosts "
            "(CHAT_BRIDGE_HTTP_HOSTS).\n"
        )
        return _reply(HTTPStatus.MISDIRECTED_REQUEST, "text/plain; charset=utf-8", body.encode())

    def _metrics(self) -> bytes:
        self.health.report()  # refreshes the gauges read from the database
        return self.metrics.exposition()

    def _config(self, host_header: str | None) -> bytes:
        """Where the page finds the broker: the WebSocket listener's port on the host the browser
        reached this server by (so that a page opened as http://192.0.2.7:8080/ connects to
        ws://192.0.2.7:9001/mqtt), or null when the bridge uses an external broker."""
        web, ws = self.web, self.ws_address
        ws_url = None
        if ws is not None:
            ws_host, ws_port = ws
            fallback = ws_host if ws_host not in ("", "0.0.0.0", "::") else self.address[0]
            host = _hostname(host_header, _url_host(str(fallback)))
            ws_url = f"ws://{host}:{ws_port}{web.ws_path}"
        body = {"ws_url": ws_url, "prefix": web.prefix, "accounts": web.accounts, "protocol": "1.1"}
        return json.dumps(body).encode() + b"\n"

    def _static(self, path: str, if_none_match: str) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        root = self.web_root
        relative = unquote(path).lstrip("/") or "index.html"
        try:
            target = (root / relative).resolve()
            inside = (
                target.is_relative_to(root)
                and not any(part.startswith(".") for part in target.relative_to(root).parts)
                and target.is_file()
            )
            if inside:
                body, etag = self._file(target)
        except (OSError, ValueError):
            inside = False
        if not inside:
            return _reply(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
        kind = CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")
        if etag in if_none_match:
            return _reply(HTTPStatus.NOT_MODIFIED, kind, b"", etag=etag)
        return _reply(HTTPStatus.OK, kind, body, etag=etag)

    def _file(self, target: Path) -> tuple[bytes, str]:
        """A file's bytes and ETag, hashed once per version of it (not once per request)."""
        stat = target.stat()
        cached = self._files.get(target)
        if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            return cached[2], cached[3]
        body = target.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        self._files[target] = (stat.st_mtime_ns, stat.st_size, body, etag)
        return body, etag


def _reply(
    status: HTTPStatus, kind: str, body: bytes, *, etag: str | None = None
) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
    headers = [("Content-Type", kind)]
    if status != HTTPStatus.NOT_MODIFIED:
        headers.append(("Content-Length", str(len(body))))
    if etag:
        # the page's files keep their names from one release to the next: revalidate each time
        headers += [("ETag", etag), ("Cache-Control", "no-cache")]
    else:
        headers.append(("Cache-Control", "no-store"))
    headers += [
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    ]
    return status, headers, body


def _error(status: HTTPStatus) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
    return _reply(status, "text/plain; charset=utf-8", f"{status.value} {status.phrase}\n".encode())
