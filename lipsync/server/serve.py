"""``python app.py``: the embedded development server (werkzeug, threaded), with the same
graceful shutdown on SIGTERM/SIGINT as the production server (``gunicorn_conf``)."""

from __future__ import annotations

import logging
import signal
import threading

from flask import Flask

from lipsync.server.factory import create_app
from lipsync.server.memory import tune_malloc
from lipsync.server.observability import configure_logging
from lipsync.server.settings import ServerSettings
from lipsync.settings import Settings

log = logging.getLogger("lipsync.web")


def serve(application: Flask) -> None:
    """Serve ``application`` on ``HOST:PORT`` until SIGTERM/SIGINT (a second Ctrl-C stops at once)."""
    from werkzeug.serving import make_server

    server_settings: ServerSettings = application.config["SERVER"]
    lifecycle = application.extensions["lifecycle"]
    tune_malloc()
    server = make_server(server_settings.host, server_settings.port, application, threaded=True)
    server.daemon_threads = True
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
