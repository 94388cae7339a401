"""The bridge's HTTP server (`--http-listen`): `/healthz`, `/metrics` and the browser client at `/`.

A small threaded server from the standard library, in daemon threads of its own: it never touches
the bridge's worker or the broker's event loop. Static files come from bridge/web/ only (no
directory listings, nothing outside it).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .metrics import Health, Metrics

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent / "web"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class HttpServerError(Exception):
    """The HTTP server could not start (its port is taken, the address is not this host's)."""


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
        else:
            self._static(path, head)

    def _static(self, path: str, head: bool) -> None:
        root = self.server.web_root
        relative = unquote(path).lstrip("/") or "index.html"
        try:
            target = (root / relative).resolve()
            inside = target.is_relative_to(root) and target.is_file()
        except (OSError, ValueError):
            inside = False
        if not inside:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", head)
            return
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            kind += "; charset=utf-8"
        self._send(HTTPStatus.OK, kind, target.read_bytes(), head)

    def _send(self, status: HTTPStatus, kind: str, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], health: Health, metrics: Metrics, web_root: Path) -> None:
        self.health = health
        self.metrics = metrics
        self.web_root = web_root.resolve()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class HttpServer:
    """Binds at construction (so that a taken port fails before anything else starts), serves after
    `start()` until `stop()`."""

    def __init__(
        self,
        host: str,
        port: int,
        health: Health,
        metrics: Metrics,
        *,
        web_root: Path = WEB_ROOT,
    ) -> None:
        try:
            self._server = _Server((host, port), health, metrics, web_root)
        except OSError as exc:
            raise HttpServerError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("HTTP on http://%s:%d/ (/healthz, /metrics)", host, port)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
