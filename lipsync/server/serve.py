"""``python app.py``: the embedded development server (werkzeug, threaded), with the same
graceful shutdown on SIGTERM/SIGINT as the production server (``gunicorn_conf``).

It is meant for one machine and trusted clients (``make serve`` is the production stack),
but it still refuses what would be dangerous behind any proxy: a request with two different
Content-Length headers, or with Content-Length and Transfer-Encoding together (request
smuggling), gets 400; at most ``MAX_CONNECTIONS`` connections are served at once (more get
503 at once), and a client that stops sending for ``CLIENT_TIMEOUT`` seconds is dropped."""

from __future__ import annotations

import json
import logging
import signal
import threading

from flask import Flask
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from lipsync.memory import tune_malloc
from lipsync.server.factory import create_app
from lipsync.server.observability import configure_logging
from lipsync.server.settings import ServerSettings
from lipsync.settings import Settings

log = logging.getLogger("lipsync.web")


CLIENT_TIMEOUT = 30.0  # s without a byte from the client before its connection is dropped


def _json_error(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": message, "code": code}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class _RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, refusing ambiguous message framing and clients that go quiet."""

    timeout = CLIENT_TIMEOUT

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if len(lengths) > 1 or (lengths and self.headers.get("Transfer-Encoding")):
            self.wfile.write(_json_error(400, "Bad Request", "the request has conflicting Content-Length / "
                                         "Transfer-Encoding headers", "bad_request"))
            self.close_connection = True
            return False
        return True


class _Server(ThreadedWSGIServer):
    """A thread per connection, at most ``max_connections`` at once: one more gets 503 at once."""

    daemon_threads = True

    def __init__(self, host: str, port: int, app, max_connections: int):
        super().__init__(host, port, app, handler=_RequestHandler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_json_error(503, "Service Unavailable", "the server has too many open "
                                            "connections; try again shortly", "busy"))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(application: Flask) -> None:
    """Serve ``application`` on ``HOST:PORT`` until SIGTERM/SIGINT (a second Ctrl-C stops at once)."""
    server_settings: ServerSettings = application.config["SERVER"]
    lifecycle = application.extensions["lifecycle"]
    tune_malloc()
    server = _Server(server_settings.host, server_settings.port, application, server_settings.max_connections)
    lifecycle.on_stopped(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
    interrupted = threading.Event()

    def on_signal(signum, frame):
        if signum == signal.SIGINT and interrupted.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        interrupted.set()
        lifecycle.begin(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f" * Talking avatar on http://localhost:{server.server_port} (loading models in the background)",
          flush=True)
    try:
        server.serve_forever()
    finally:
        lifecycle.wait(5)
        log.info("stopped")


def main() -> None:
    """Read the settings from the environment once, configure logging, serve."""
    settings = Settings.from_env()
    server_settings = ServerSettings.from_env()
    configure_logging(server_settings.log_level, server_settings.log_format)
    serve(create_app({"SETTINGS": settings, "SERVER": server_settings}))
