"""An in-process server that only lists models (``GET /v1/models``), for fingerprint tests: no model is loaded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ListingServer(ThreadingHTTPServer):
    """Answers GET /v1/models with ``models`` (changeable while it runs); records the Authorization headers."""

    daemon_threads = True

    def __init__(self, models: list[dict[str, Any]], status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), _ListingHandler)
        self.models = models
        self.status = status
        self.authorizations: list[str | None] = []

    @property
    def base_url(self) -> str:
        """The OpenAI API root, as a model's base_url."""
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _ListingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ListingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.authorizations.append(self.headers.get("Authorization"))
        ok = self.path == "/v1/models" and self.server.status == 200
        body = {"object": "list", "data": self.server.models} if ok else {"error": {"message": "not here"}}
        data = json.dumps(body).encode()
        self.send_response(200 if ok else (self.server.status if self.server.status != 200 else 404))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def listing(models: list[dict[str, Any]], status: int = 200) -> Iterator[ListingServer]:
    """A running listing server on a free port, shut down and closed on exit."""
    server = ListingServer(models, status)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
