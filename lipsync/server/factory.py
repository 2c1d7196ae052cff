"""``create_app(config)``: the Flask app, its extensions and its blueprints.

Settings live in ``app.config["SETTINGS"]`` (the pipeline's ``Settings``) and
``app.config["SERVER"]`` (``ServerSettings``); the shared resources in ``app.extensions``:
``lipsync`` (the preloaded ``LipsyncService``), ``jobs`` (the ``JobQueue``), ``render_slots``,
``lifecycle``, ``security``, ``metrics`` and ``openapi``.
"""

from __future__ import annotations

import atexit
import os
import threading

from flask import Flask
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from lipsync.errors import LipsyncError
from lipsync.jobs import LocalJobQueue
from lipsync.live.manager import SessionManager
from lipsync.memory import release_memory
from lipsync.server import hooks
from lipsync.server import sessions_api as sessions_api_module
from lipsync.server.api import api
from lipsync.server.avatars_api import avatars_api
from lipsync.server.jobs_api import jobs_api
from lipsync.server.lifecycle import Lifecycle, RenderSlots
from lipsync.server.links import job_links
from lipsync.server.observability import Metrics, RequestObserver, record_finished_job
from lipsync.server.openapi import build_openapi
from lipsync.server.ops import ops
from lipsync.server.pages import pages
from lipsync.server.security import Security
from lipsync.server.settings import ServerSettings
from lipsync.server.state_metrics import register_state_metrics
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from lipsync.tempdirs import sweep_stale_temp


def create_app(config: dict | None = None) -> Flask:
    """Build the app.

    ``config`` may hold ``SETTINGS`` (a ``Settings``) and ``SERVER`` (a ``ServerSettings``),
    both read from the environment when absent; ``LOAD_IN_BACKGROUND`` (default True: serve
    health while models load) and ``JOB_QUEUE`` (a started ``JobQueue``; default: a
    ``LocalJobQueue`` over the service, or with ``QUEUE_URL`` the cluster's ``RedisJobQueue``).
    The app starts the model loading and the job worker (cluster: only the upkeep);
    ``close_app(app)`` stops them (tests, embedding).

    ``SERVER_ROLE=stream`` builds the same app for the stack's streaming process (README
    "Production"): it only follows jobs (SSE ``/events``, ``/stream``) from the shared job
    store and files, so it loads no model and runs no worker.
    """
    app = Flask("lipsync.server", root_path=_repo_root(), template_folder="templates", static_folder="static")
    app.config.update(LOAD_IN_BACKGROUND=True)
    app.config.update(config or {})
    settings: Settings = app.config.get("SETTINGS") or Settings.from_env()
    server: ServerSettings = app.config.get("SERVER") or ServerSettings.from_env()
    app.config.update(SETTINGS=settings, SERVER=server)
    # Multipart bodies carry the upload plus a little form overhead; the exact
    # per-file limit is checked by the service with a clearer message.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + 1024 * 1024
    app.config["MAX_FORM_PARTS"] = hooks.MAX_FORM_PARTS

    metrics = Metrics()
    app.extensions["metrics"] = metrics
    service = LipsyncService(settings)
    app.extensions["lipsync"] = service
    streaming_only = server.server_role == "stream"
    # The stream role follows jobs only: no temp folders of its own, no models (its health answers
    # 503; nginx never asks it).
    if not streaming_only:
        sweep_stale_temp(service.temp_root())
        if app.config["LOAD_IN_BACKGROUND"]:
            loader = threading.Thread(target=service.load, name="lipsync-load", daemon=True)
            loader.start()
            app.extensions["loader"] = loader
        else:
            service.load()
    jobs = app.config.get("JOB_QUEUE")
    if jobs is None and settings.queue_url:
        # cluster mode (README "Cluster"): jobs in Redis, rendered by `python -m lipsync worker`
        # processes; this node only submits, reads, follows and cancels, and takes its turn at upkeep
        from lipsync.jobs.redis_queue import RedisJobQueue

        jobs = RedisJobQueue(service, settings, job_links=job_links)
        jobs.start()
        atexit.register(jobs.stop)
    elif jobs is None:
        jobs = LocalJobQueue(service, settings, on_job_end=lambda state: _job_ended(metrics, state),
                             job_links=job_links)
        if not streaming_only:  # the stream role reads the store; the app process's worker renders
            jobs.start()
            atexit.register(jobs.stop)
    app.extensions["jobs"] = jobs
    slots = RenderSlots(server.max_sync_renders, server.sync_wait_seconds)
    app.extensions["render_slots"] = slots
    lifecycle = Lifecycle(jobs, slots, server.shutdown_grace_seconds)
    app.extensions["lifecycle"] = lifecycle
    sessions = SessionManager(service, slots.slot, max_sessions=settings.max_sessions,
                              idle_timeout=settings.session_idle_seconds, max_seconds=settings.session_max_seconds)
    app.extensions["sessions"] = sessions
    lifecycle.on_stopping(sessions.close_all)  # live sessions end first: they would hold render slots for ever
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"ping_interval": sessions_api_module.PING_S,
                                                  "max_message_size": sessions_api_module.MAX_MESSAGE_BYTES})
    app.extensions["security"] = Security(server, metrics)
    app.extensions["openapi"] = build_openapi(settings, server)
    register_state_metrics(metrics, service, jobs, slots, lifecycle)

    for blueprint in (pages, api, jobs_api, avatars_api, sessions_api_module.sessions_api, ops):
        app.register_blueprint(blueprint)
    app.before_request(hooks.guard)
    app.after_request(hooks.decorate)
    app.register_error_handler(LipsyncError, hooks.lipsync_error)
    app.register_error_handler(HTTPException, hooks.http_error)
    app.register_error_handler(Exception, hooks.unexpected_error)
    app.wsgi_app = RequestObserver(app.wsgi_app, metrics)
    if server.trusted_proxies:
        n = server.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)
    return app


def close_app(app: Flask, timeout: float = 10.0) -> None:
    """Stop what ``create_app`` started: the job worker (a running job ends as ``interrupted``)
    and, if it is still running, wait for the model loading."""
    app.extensions["sessions"].close_all("shutdown")
    app.extensions["jobs"].stop(timeout)
    loader = app.extensions.get("loader")
    if loader is not None:
        loader.join(timeout)


def _job_ended(metrics: Metrics, state: dict) -> None:
    """The queue's on_job_end: give the render's memory back, then the job's log line and metrics."""
    release_memory()
    record_finished_job(metrics, state)


def _repo_root() -> str:
    """The folder holding ``templates/`` and ``static/`` (the repository root, beside ``lipsync/``)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
