"""The HTTP server's part for the browser client: static files from bridge/web/ only (types, caching,
CSP, nothing outside the folder), `/config.json` (where the page finds the broker), and a shipped page
that needs no inline script or style."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bridge.http import WEB_ROOT, HttpServer, WebConfig
from bridge.metrics import Health, Metrics


@pytest.fixture(scope="module")
def web_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("http")
    root = tmp_path / "web"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>t</title>")
    (root / "app.js").write_text("console.log(1)")
    (root / "app.css").write_text("body{}")
    (root / "favicon.svg").write_text("<svg/>")
    (root / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (root / ".secret").write_text("hidden")
    (tmp_path / "outside.txt").write_text("outside")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    return root


def serve(root: Path = WEB_ROOT, **options: object) -> HttpServer:
    health = Health(Metrics(), lambda: None, min_interval=0)  # type: ignore[arg-type,return-value]
    server = HttpServer("127.0.0.1", 0, health, Metrics(), web_root=root, **options)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture(scope="module")
def server(web_root: Path) -> Iterator[HttpServer]:
    s = serve(web_root)
    yield s
    s.stop()


def raw(server: HttpServer, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    """A request exactly as written (no client-side normalization of the path)."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as conn:
        lines = [f"GET {path} HTTP/1.0", *headers, "", ""]
        conn.sendall("\r\n".join(lines).encode("latin-1"))
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, body


def test_static_files_have_their_types_an_etag_and_a_policy(server: HttpServer) -> None:
    for path, kind in [
        ("/", "text/html; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
        ("/sub/data.bin", "application/octet-stream"),
    ]:
        status, headers, _ = raw(server, path)
        assert status == 200, path
        assert headers["content-type"] == kind, path
        assert headers["cache-control"] == "no-cache" and headers["etag"].startswith('"'), path
        assert headers["x-content-type-options"] == "nosniff"
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp

    status, headers, body = raw(server, "/app.js")
    assert body == b"console.log(1)"
    status, again, body = raw(server, "/app.js", f"If-None-Match: {headers['etag']}")
    assert status == 304 and body == b"" and again["etag"] == headers["etag"]
    status, _, body = raw(server, "/app.js", 'If-None-Match: "stale"')
    assert status == 200 and body == b"console.log(1)"


@pytest.mark.parametrize(
    "path",
    [
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/..%2foutside.txt",
        "/sub/../../outside.txt",
        "/%2e%2e%2f%2e%2e%2fetc/passwd",
        "//etc/passwd",
        "/link.txt",  # a symlink out of the folder
        "/.secret",
        "/sub/",
        "/sub",
        "/nothing-here",
        "/app.js%00.css",
        "/..\\outside.txt",
    ],
)
def test_nothing_outside_the_folder_nor_hidden_nor_a_directory(server: HttpServer, path: str) -> None:
    status, headers, body = raw(server, path)
    assert status == 404, path
    assert b"outside" not in body and b"hidden" not in body and b"root:" not in body
    assert headers["cache-control"] == "no-store"


def test_config_json_points_the_page_at_the_websocket_listener(web_root: Path) -> None:
    s = serve(
        web_root,
        web=WebConfig(prefix="acme/chat", accounts=True),
        ws_address=("0.0.0.0", 9001),
        hosts=("chat.example.test",),
    )
    try:

        def config(*headers: str) -> dict[str, object]:
            status, fields, body = raw(s, "/config.json", *headers)
            assert status == 200 and fields["content-type"] == "application/json"
            assert fields["cache-control"] == "no-store"
            return dict(json.loads(body))

        # the host the browser used, with the listener's port
        got = config("Host: chat.example.test:8080")
        assert got == {
            "ws_url": "ws://chat.example.test:9001/mqtt",
            "prefix": "acme/chat",
            "accounts": True,
            "protocol": "1.1",
        }
        assert config("Host: 192.0.2.7:8080")["ws_url"] == "ws://192.0.2.7:9001/mqtt"
        assert config("Host: [2001:db8::1]:8080")["ws_url"] == "ws://[2001:db8::1]:9001/mqtt"
        assert config("Host: localhost")["ws_url"] == "ws://localhost:9001/mqtt"
        # no Host: the server's own address; one that is not a plain hostname is not answered
        assert config()["ws_url"] == "ws://127.0.0.1:9001/mqtt"
        for bad in ('Host: evil"><script>', "Host: a b", "Host: x/y:1", "Host: [::1"):
            assert raw(s, "/config.json", bad)[0] == 421, bad

        # a listener on one address: that address when the Host header is unusable
        s.ws_address = ("127.0.0.5", 9101)
        assert config()["ws_url"] == "ws://127.0.0.5:9101/mqtt"
        assert config("Host: localhost:8080")["ws_url"] == "ws://localhost:9101/mqtt"

        # no WebSocket listener (an external broker): the page asks for the URL
        s.ws_address = None
        assert config("Host: localhost:8080")["ws_url"] is None
    finally:
        s.stop()


def test_only_hosts_that_name_the_server_are_answered(web_root: Path) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 makes the browser
    send `Host: evil.example`; the server must not answer it (else that page reads /metrics,
    /healthz and /config.json of the operator's machine)."""
    default = serve(web_root)  # no names given: IP addresses and localhost only
    try:
        assert raw(default, "/config.json", "Host: evil.example")[0] == 421
        assert raw(default, "/metrics", "Host: evil.example:8080")[0] == 421
        for ok in ("Host: 127.0.0.1:8080", "Host: localhost", "Host: [::1]:8080"):
            assert raw(default, "/config.json", ok)[0] == 200, ok
    finally:
        default.stop()
    s = serve(web_root, hosts=("chat.example.test", "Proxy.Example.Test."))
    try:
        for path in ("/metrics", "/healthz", "/config.json", "/", "/app.js"):
            status, fields, body = raw(s, path, "Host: evil.example:8080")
            assert status == 421, path
            assert b"evil.example" in body and b"--http-hosts" in body
            assert b"chat_bridge" not in body and fields["cache-control"] == "no-store"
        for refused in ("Host: evil.example", "Host: 127.0.0.1.evil.example", "Host: localhost.evil.example"):
            assert raw(s, "/config.json", refused)[0] == 421, refused
        answered = (
            "Host: 127.0.0.1:8080",
            "Host: localhost:8080",
            "Host: LOCALHOST",
            "Host: app.localhost",
            "Host: [::1]:8080",
            "Host: 192.0.2.7",
            "Host: chat.example.test",  # a name the operator gave (behind a proxy that sets Host)
            "Host: CHAT.example.test.:443",
            "Host: proxy.example.test",
        )
        for ok in answered:
            assert raw(s, "/config.json", ok)[0] == 200, ok
        assert raw(s, "/config.json")[0] == 200  # no Host: not a browser
    finally:
        s.stop()
    anything = serve(web_root, hosts=("*",))
    try:
        assert raw(anything, "/config.json", "Host: evil.example")[0] == 200
    finally:
        anything.stop()


def test_config_json_defaults() -> None:
    s = serve()
    try:
        _, _, body = raw(s, "/config.json", "Host: localhost:8080")
        assert json.loads(body) == {"ws_url": None, "prefix": "chat/v1", "accounts": None, "protocol": "1.1"}
    finally:
        s.stop()


class _Inline(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block: inline scripts, styles, handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self.scripts: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        for name, _ in attrs:
            if name.startswith("on") or name == "style":
                self.blocked.append(f"<{tag} {name}>")
        if tag == "style":
            self.blocked.append("<style>")
        if tag == "script":
            if not names.get("src"):
                self.blocked.append("<script> without src")
            else:
                self.scripts.append(str(names["src"]))
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script" and data.strip():
            self.blocked.append("inline script text")


def test_the_shipped_page_needs_no_inline_code_and_its_files_are_there() -> None:
    page = _Inline()
    page.feed((WEB_ROOT / "index.html").read_text())
    assert page.blocked == []
    assert page.scripts, "the page loads its script"
    for src in page.scripts:
        assert (WEB_ROOT / src).is_file(), src


def test_http_hosts_option_takes_host_names_only() -> None:
    from bridge.cli import http_hosts_from
    from bridge.config import ConfigError

    assert http_hosts_from(" Chat.Example.com, proxy.example.test. ,,*") == (
        "chat.example.com",
        "proxy.example.test",
        "*",
    )
    for bad in ("https://chat.example.com", "chat.example.com:443", "a b", "-x"):
        with pytest.raises(ConfigError, match="--http-hosts"):
            http_hosts_from(bad)
