"""The monitor's web server: the page (`/`), its script and style (`/static/...`, shipped in the
package: the page works offline) and the JSON API (`/api/state`), on stdlib's ThreadingHTTPServer."""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from p2pcold.utils import P2PColdError, get_logger

log = get_logger("monitor")

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class MonitorServer:
    """Serves `state()` (a JSON-able dict) and the page from a thread; `close()` stops it within ~0.5 s."""

    def __init__(self, host: str, port: int, state: Callable[[], dict]):
        handler = type("Handler", (_Handler,), {"state": staticmethod(state)})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise P2PColdError(f"monitor: cannot serve on {host}:{port} ({e.strerror or e}); choose another --port") from None
        self._server.daemon_threads = True  # a browser holding a connection open never blocks the shutdown
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.25}, name="p2pcold-monitor-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)


class _Handler(BaseHTTPRequestHandler):
    state: Callable[[], dict]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/api/state":
            self._send(HTTPStatus.OK, json.dumps(self.state()).encode(), "application/json")
            return
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        file = STATIC / name
        if "/" in name or file.suffix not in CONTENT_TYPES or not file.is_file():  # only the page's own files
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            return
        self._send(HTTPStatus.OK, file.read_bytes(), CONTENT_TYPES[file.suffix])

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("http: " + format, *args)
