"""gunicorn's configuration, read from ServerSettings: `gunicorn -c python:lipsync.server.gunicorn_conf`.

`make serve` (lipsync/server/stack.py) runs two of these behind nginx: SERVER_ROLE=app
(gthread workers: renders, health, everything short) and SERVER_ROLE=stream (one gevent
worker for the long-lived /events and /stream connections).

One worker per GPU (each worker preloads its own model and owns one card);
threads serve health probes and queue requests while the engine is busy.

Logs: one JSON line per request from the app itself (``lipsync.access``), so
gunicorn's own access log is off; gunicorn's error log goes through the same
JSON formatter. Graceful shutdown: on SIGTERM a worker stops taking new
generate/job requests (503 ``shutting_down``), lets the running job and
synchronous renders finish for up to ``SHUTDOWN_GRACE_SECONDS``, fails what
is still running as ``interrupted``, then exits; ``graceful_timeout`` gives
it that long plus a margin before the master kills it.
"""

import os
import signal

from lipsync.server.settings import ServerSettings

_settings = ServerSettings.from_env()

bind = _settings.bind or f"{_settings.host}:{_settings.port}"
wsgi_app = "lipsync.server:create_app()"
control_socket_disable = True  # two gunicorns run side by side in the stack; nothing uses it
gpu_count = _settings.gpu_count
timeout = _settings.gunicorn_timeout   # long texts take minutes on a CPU
if _settings.server_role == "stream":
    # Following jobs (SSE, /stream) is waiting, not work: one gevent worker holds thousands of
    # such connections as greenlets, so they never take the threads that renders and health
    # checks need (those run in the app role's gthread workers). The stack routes them here.
    worker_class = "gevent"
    workers = 1
    worker_connections = _settings.stream_connections
else:
    worker_class = "gthread"
    workers = _settings.worker_count
    threads = _settings.gunicorn_threads
graceful_timeout = int(_settings.shutdown_grace_seconds) + 20
preload_app = False  # CUDA must be initialised inside each worker, never in the master
accesslog = None     # the app writes one JSON line per request (request id, route, status, duration, bytes)
loglevel = _settings.log_level.lower()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"lipsync": {"()": "lipsync.server.observability.JsonFormatter" if _settings.log_format == "json"
                               else "lipsync.server.observability.TextFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "lipsync", "stream": "ext://sys.stderr"}},
    "root": {"level": _settings.log_level.upper(), "handlers": ["stderr"]},
    "loggers": {"gunicorn.error": {"level": _settings.log_level.upper(), "handlers": ["stderr"], "propagate": False},
                "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False}},
}


def post_fork(server, worker):
    """Pin each worker to its own GPU when GPU_COUNT is set; cap glibc's malloc arenas."""
    if gpu_count > 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str((worker.age - 1) % gpu_count)
    from lipsync.memory import tune_malloc

    tune_malloc()


def post_worker_init(worker):
    """Replace the worker's SIGTERM handler: drain first, then let gunicorn stop the worker.

    gunicorn's own handler stops accepting connections at once, so clients could no longer
    follow their jobs during the grace period; ours keeps serving (reads, health = 503) until
    the running work is finished or interrupted, then sets ``worker.alive = False``.
    """
    lifecycle = _lifecycle(worker)
    if lifecycle is None:
        return

    def stop_worker():
        worker.alive = False

    lifecycle.on_stopped(stop_worker)

    def on_sigterm(signum, frame):
        lifecycle.begin("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server, worker):
    """The worker is exiting. After SIGTERM the drain has run (or is finishing); after a quick
    stop (SIGINT, SIGQUIT) the job queue is stopped now: a running job is recorded as
    ``interrupted``, never left 'running'."""
    lifecycle = _lifecycle(worker)
    if lifecycle is not None:
        lifecycle.begin("worker exit", grace=0)  # does nothing when the SIGTERM drain began
        lifecycle.wait(_settings.shutdown_grace_seconds + 15)


def on_exit(server):
    server.log.info("gunicorn stopped")


def _lifecycle(worker):
    app = getattr(worker, "wsgi", None)
    extensions = getattr(app, "extensions", None) or {}
    return extensions.get("lifecycle")
