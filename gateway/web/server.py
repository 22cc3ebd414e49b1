"""A small built-in HTTP server for status pages (standard library only).

:class:`StatusServer` serves a fixed set of routes from a daemon thread: a static page
(``/``), a JSON endpoint the page polls (``/api/status``) and Prometheus ``/metrics``.
Handlers are callables returning ``(content type, body bytes)``; one that raises gives a
500 with a one-line JSON error (logged), and the server keeps serving.  Used by the
gateway (:mod:`gateway.service`) and the aggregator (:mod:`cloud_aggregator.web`).

The page has no authentication: listen on loopback (the default) or behind a proxy.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[], tuple[str, bytes]]
HTML = "text/html; charset=utf-8"
JSON = "application/json"


def json_route(fn: Callable[[], Any]) -> Handler:
    """A route answering ``fn()`` as JSON (non-finite floats become null)."""

    def handler() -> tuple[str, bytes]:
        return JSON, json.dumps(_finite(fn()), default=str, separators=(",", ":")).encode()

    return handler


def static_route(package: str, name: str) -> Handler:
    """A route answering a file shipped inside ``package`` (read once)."""
    body = resources.files(package).joinpath(name).read_bytes()
    ctype = HTML if name.endswith(".html") else "application/octet-stream"
    return lambda: (ctype, body)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class StatusServer:
    """``StatusServer(("127.0.0.1", 9108), routes={"/": ..., "/api/status": ...}).start()``.

    Port 0 picks a free port; :attr:`port` tells which.
    """

    def __init__(self, address: tuple[str, int], *, routes: Mapping[str, Handler], name: str = "status-http"):
        self.routes = dict(routes)
        self.name = name
        routes_ = self.routes

        class _Handler(BaseHTTPRequestHandler):
            server_version = "fedgate"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                route = routes_.get(path)
                if route is None:
                    self._send(404, JSON, b'{"error":"not found"}')
                    return
                try:
                    ctype, body = route()
                except Exception as exc:  # noqa: BLE001 - one failing route must not stop the server
                    log.exception("status page: %s failed", path)
                    self._send(500, JSON, json.dumps({"error": str(exc)[:200]}).encode())
                    return
                self._send(200, ctype, body)

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http %s: " + fmt, self.client_address[0], *args)

        self.httpd = ThreadingHTTPServer(address, _Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}"

    def start(self) -> "StatusServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=self.name, daemon=True)
        self._thread.start()
        log.info("status page on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()
