"""The bridge's HTTP server (`--http-listen`): `/healthz`, `/metrics`, and the browser client at `/`
with its `/config.json` (where the page finds the broker's WebSocket listener).

A small threaded server from the standard library, in daemon threads of its own: it never touches
the bridge's worker or the broker's event loop. Static files come from bridge/web/ only (no
directory listings, no hidden files, nothing outside it), each with its content type, an ETag and a
Content-Security-Policy that allows no inline script or style.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .metrics import Health, Metrics

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent / "web"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

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


def _url_host(host: str) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that sends nothing does not hold a thread for long
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "chat-bridge"

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            healthy, body = self.server.health.report()
            status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, "application/json", json.dumps(body).encode() + b"\n", head)
        elif path == "/metrics":
            self.server.health.report()  # refreshes the gauges read from the database
            self._send(HTTPStatus.OK, PROMETHEUS_TEXT, self.server.metrics.exposition(), head)
        elif path == "/config.json":
            self._send(HTTPStatus.OK, "application/json", self._config(), head)
        else:
            self._static(path, head)

    def _config(self) -> bytes:
        """Where the page finds the broker: the WebSocket listener's port on the host the browser
        reached this server by (so that a page opened as http://192.0.2.7:8080/ connects to
        ws://192.0.2.7:9001/mqtt), or null when the bridge uses an external broker."""
        web, ws = self.server.web, self.server.ws_address
        ws_url = None
        if ws is not None:
            ws_host, ws_port = ws
            fallback = ws_host if ws_host not in ("", "0.0.0.0", "::") else self.server.server_address[0]
            host = _hostname(self.headers.get("Host"), _url_host(str(fallback)))
            ws_url = f"ws://{host}:{ws_port}{web.ws_path}"
        body = {"ws_url": ws_url, "prefix": web.prefix, "accounts": web.accounts, "protocol": "1.1"}
        return json.dumps(body).encode() + b"\n"

    def _static(self, path: str, head: bool) -> None:
        root = self.server.web_root
        relative = unquote(path).lstrip("/") or "index.html"
        try:
            target = (root / relative).resolve()
            inside = (
                target.is_relative_to(root)
                and not any(part.startswith(".") for part in target.relative_to(root).parts)
                and target.is_file()
            )
        except (OSError, ValueError):
            inside = False
        if not inside:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", head)
            return
        body = target.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        kind = CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")
        if etag in (self.headers.get("If-None-Match") or ""):
            self._send(HTTPStatus.NOT_MODIFIED, kind, b"", True, etag=etag)
            return
        self._send(HTTPStatus.OK, kind, body, head, etag=etag)

    def _send(
        self, status: HTTPStatus, kind: str, body: bytes, head: bool, *, etag: str | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        if status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Length", str(len(body)))
        if etag:
            # the page's files keep their names from one release to the next: revalidate each time
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], health: Health, metrics: Metrics, web_root: Path, web: WebConfig
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.web_root = web_root.resolve()
        self.web = web
        self.ws_address: tuple[str, int] | None = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


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
    ) -> None:
        try:
            self._server = _Server((host, port), health, metrics, web_root, web or WebConfig())
            self._server.ws_address = ws_address
        except OSError as exc:
            raise HttpServerError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def ws_address(self) -> tuple[str, int] | None:
        return self._server.ws_address

    @ws_address.setter
    def ws_address(self, address: tuple[str, int] | None) -> None:
        self._server.ws_address = address

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("HTTP on http://%s:%d/ (the browser client; /healthz, /metrics)", _url_host(host), port)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
