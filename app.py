"""The web service: a thin Flask layer over ``lipsync.service.LipsyncService``.

    python app.py                      # http://localhost:3000 (PORT overrides)
    gunicorn -c gunicorn.conf.py       # production

Settings come from the environment once (``lipsync.settings.Settings``) and
live in ``app.config["SETTINGS"]``; the preloaded pipeline lives in
``app.extensions["lipsync"]``, the job queue in ``app.extensions["jobs"]``.

Besides the routes this module holds the request hooks (README "Security"):
which routes need an API key and count against which rate limit, CORS and
security headers. The guards themselves are library code: API keys and rate
limits in ``lipsync.security``, upload checks by content in
``lipsync.uploads``, render slots and the graceful shutdown (README
"Operations") in ``lipsync.lifecycle``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading

from flask import (Blueprint, Flask, Response, current_app, g, jsonify, render_template, request, send_file,
                   stream_with_context, url_for)
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wsgi import LimitedStream, wrap_file

from lipsync.errors import InvalidInputError, LipsyncError
from lipsync.jobs import JobQueue, JobRequest, LocalJobQueue, follow_live, open_live
from lipsync.lifecycle import Lifecycle, RenderSlots
from lipsync.memory import release_memory, tune_malloc
from lipsync.observability import (ENV_ERROR_CODE, ENV_JOB_ID, ENV_KEY_ID, ENV_ROUTE, ENV_TEXT, METRICS_CONTENT_TYPE,
                                   Metrics, RequestObserver, clip, record_finished_job)
from lipsync.openapi import build_openapi
from lipsync.security import Security, presented_key
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from lipsync.state_metrics import register_state_metrics
from lipsync.tempdirs import process_temp_dir, sweep_stale_temp
from lipsync.tts.base import LANGUAGES
from lipsync.uploads import check_image, clean_text, normalize_recording, read_upload

log = logging.getLogger("lipsync.web")

DEFAULT_LANGUAGE = "ru"

pages = Blueprint("pages", __name__)
api = Blueprint("api", __name__, url_prefix="/api")
ops = Blueprint("ops", __name__)

# Never behind an API key: the page and what it loads before the user can do anything.
PUBLIC_ENDPOINTS = frozenset({"pages.index", "static", "api.health", "api.avatar", "api.openapi"})
# Endpoints that start work: the strict rate limit, refused while shutting down.
WRITE_ENDPOINTS = frozenset({"api.generate", "api.submit_job"})
# The looser limit: reads and cancels of jobs.
READ_ENDPOINTS = frozenset({"api.job_status", "api.job_events", "api.job_video", "api.job_stream", "api.cancel_job"})

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "media-src 'self' blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
                           "base-uri 'self'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), geolocation=(), payment=(), usb=()",
}
CORS_EXPOSED = ("X-Request-ID, Retry-After, Location, Content-Range, Accept-Ranges, Content-Length, Server-Timing, "
                "X-Processing-Time, X-Video-Duration, X-Video-Frames, X-Engine, X-RateLimit-Limit, "
                "X-RateLimit-Remaining, X-RateLimit-Reset")
CORS_ALLOWED_HEADERS = "Authorization, X-API-Key, Content-Type, X-Request-ID, Range"


def create_app(config: dict | None = None) -> Flask:
    """Build the app.

    ``config`` may hold ``SETTINGS`` (a ``Settings``), ``LOAD_IN_BACKGROUND``
    (default True: serve health while models load) and ``JOB_QUEUE`` (a
    started ``JobQueue``; default: a ``LocalJobQueue`` over the service).
    """
    app = Flask(__name__)
    app.config.update(LOAD_IN_BACKGROUND=True)
    app.config.update(config or {})
    settings: Settings = app.config.get("SETTINGS") or Settings.from_env()
    app.config["SETTINGS"] = settings
    # Multipart bodies carry the upload plus a little form overhead; the exact
    # per-file limit is checked by the service with a clearer message.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + 1024 * 1024

    metrics = Metrics()
    app.extensions["metrics"] = metrics
    service = LipsyncService(settings)
    app.extensions["lipsync"] = service
    sweep_stale_temp(service.temp_root())
    if app.config["LOAD_IN_BACKGROUND"]:
        threading.Thread(target=service.load, name="lipsync-load", daemon=True).start()
    else:
        service.load()
    jobs = app.config.get("JOB_QUEUE")
    if jobs is None:
        jobs = LocalJobQueue(service, settings, on_job_end=lambda state: _job_ended(metrics, state))
        jobs.start()
        atexit.register(jobs.stop)
    app.extensions["jobs"] = jobs
    slots = RenderSlots(settings.max_sync_renders, settings.sync_wait_seconds)
    app.extensions["render_slots"] = slots
    lifecycle = Lifecycle(jobs, slots, settings.shutdown_grace_seconds)
    app.extensions["lifecycle"] = lifecycle
    app.extensions["security"] = Security(settings, metrics)
    app.extensions["openapi"] = build_openapi(settings)
    register_state_metrics(metrics, service, jobs, slots, lifecycle)

    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_blueprint(ops)
    app.before_request(_guard)
    app.after_request(_decorate)
    app.register_error_handler(LipsyncError, _lipsync_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.wsgi_app = RequestObserver(app.wsgi_app, metrics)
    if settings.trusted_proxies:
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)
    return app


def _service() -> LipsyncService:
    return current_app.extensions["lipsync"]


def _jobs() -> JobQueue:
    return current_app.extensions["jobs"]


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


def _job_ended(metrics: Metrics, state: dict) -> None:
    """The queue's on_job_end: give the render's memory back, then the job's log line and metrics."""
    release_memory()
    record_finished_job(metrics, state)


# --------------------------------------------------------------------- pages
@pages.get("/")
def index():
    settings = _settings()
    return render_template("index.html", languages=LANGUAGES, max_text_chars=settings.max_text_chars,
                           max_upload_mb=settings.max_upload_bytes // (1024 * 1024))


@ops.get("/metrics")
def metrics():
    return Response(current_app.extensions["metrics"].render(), content_type=METRICS_CONTENT_TYPE,
                    headers={"Cache-Control": "no-store"})


# ----------------------------------------------------------------------- api
@api.get("/health")
def health():
    info = _service().describe()
    if current_app.extensions["lifecycle"].stopping.is_set():
        info["status"] = "shutting_down"  # load balancers: send new work elsewhere
    return jsonify(info), 200 if info["status"] == "ready" else 503


@api.get("/openapi.json")
def openapi():
    return jsonify(current_app.extensions["openapi"])


@api.get("/avatar")
def avatar():
    image = _service().avatar_jpeg
    if image is None:
        raise LipsyncError("the avatar is not loaded yet", code="not_ready", status=503)
    return Response(image, mimetype="image/jpeg", headers={"Cache-Control": "no-cache"})


@api.post("/generate")
def generate():
    service = _service()
    inputs = _generate_inputs()
    with current_app.extensions["render_slots"].slot():
        with process_temp_dir("http", service.temp_root()) as tmp:
            out_path = os.path.join(tmp, "avatar.mp4")
            result = service.generate(out_path, **inputs)
            # Streamed from the open file, not read into memory; the folder can go
            # at once (POSIX keeps the open file readable), the response closes it.
            video_file = open(out_path, "rb")
            size = os.fstat(video_file.fileno()).st_size
    current_app.extensions["metrics"].observe_stages(result.timings, "sync")
    timings = result.timings
    headers = {
        "Content-Disposition": 'inline; filename="avatar.mp4"',
        "X-Processing-Time": f"{timings['total'] / 1000.0:.3f}",
        "X-Video-Duration": f"{result.duration:.3f}",
        "X-Video-Frames": str(result.frames),
        "X-Engine": result.engine,
        "Server-Timing": ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in timings.items()),
        "Content-Length": str(size),
    }
    return Response(wrap_file(request.environ, video_file), mimetype="video/mp4", headers=headers,
                    direct_passthrough=True)


@api.post("/jobs")
def submit_job():
    inputs = _generate_inputs()  # validated: a JSON object or a multipart form
    if request.mimetype == "multipart/form-data":
        callback = request.form.get("callback_url")
    else:
        callback = request.get_json(force=True, silent=True).get("callback_url")
    job = _jobs().submit(JobRequest(**inputs, callback_url=callback))
    request.environ[ENV_JOB_ID] = job.id
    state = {**job.to_dict(), **_job_urls(job.id)}
    return jsonify(state), 202, {"Location": state["status_url"]}


def _job_urls(job_id: str) -> dict:
    return {"status_url": url_for("api.job_status", job_id=job_id),
            "events_url": url_for("api.job_events", job_id=job_id),
            "video_url": url_for("api.job_video", job_id=job_id),
            "stream_url": url_for("api.job_stream", job_id=job_id)}


def _job_or_404(job_id: str) -> dict:
    state = _jobs().get(job_id)  # None for anything not shaped like a job id: ids never become paths here
    if state is None:
        raise LipsyncError("no such job (it may have expired)", code="job_not_found", status=404)
    request.environ[ENV_JOB_ID] = job_id
    return state


@api.get("/jobs/<job_id>")
def job_status(job_id: str):
    return jsonify({**_job_or_404(job_id), **_job_urls(job_id)})


@api.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    _job_or_404(job_id)
    jobs = _jobs()
    lifecycle: Lifecycle = current_app.extensions["lifecycle"]

    def stream():
        for state in jobs.events(job_id, timeout=300, heartbeat=15):
            if lifecycle.stopped.is_set():
                return  # the server is going away: the client reconnects to the next one
            yield ": keep-alive\n\n" if state is None else f"data: {json.dumps(state)}\n\n"

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@api.get("/jobs/<job_id>/video")
def job_video(job_id: str):
    state = _job_or_404(job_id)
    path = _jobs().result_path(job_id)
    if path is None:
        raise LipsyncError(f"the video is not ready (job {state['status']})", code="job_not_done", status=409)
    return send_file(path, mimetype="video/mp4", conditional=True, download_name="avatar.mp4")


@api.get("/jobs/<job_id>/stream")
def job_stream(job_id: str):
    """The video while it is being made: fragmented MP4 over a chunked response.

    Once the job is done this is the finished file (with Range support).
    """
    state = _job_or_404(job_id)
    jobs = _jobs()
    # Wait for the first fragment (the job may still be queued or speaking).
    handle = open_live(jobs, job_id, state, timeout=300, stopped=current_app.extensions["lifecycle"].stopped)
    if handle is None:
        return job_video(job_id)
    return Response(stream_with_context(follow_live(jobs, job_id, handle)), mimetype="video/mp4",
                    headers={"Cache-Control": "no-cache"})


@api.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    jobs = _jobs()
    if not jobs.cancel(job_id):
        raise LipsyncError("no such job (it may have expired)", code="job_not_found", status=404)
    request.environ[ENV_JOB_ID] = job_id
    state = jobs.get(job_id)
    return (jsonify(state), 200) if state is not None else ("", 204)


# -------------------------------------------------------------------- inputs
def _generate_inputs() -> dict:
    """The generate request as keyword arguments of ``LipsyncService.generate``, checked before any work.

    JSON: ``{"text", "language"}``. multipart/form-data: an ``audio`` file
    (lip-sync a recording, no TTS) or ``text``/``language`` fields, plus an
    optional ``avatar`` image replacing the preloaded one for this request.
    Uploads are checked by content (not by name): the avatar must be a PNG or
    JPEG within ``MAX_IMAGE_PIXELS``; a recording must be a known audio
    container, is decoded once with ffmpeg forced to that demuxer and cut at
    ``MAX_AUDIO_SECONDS`` (so a tiny file that expands to hours is refused
    without being decoded whole), and goes on as 16 kHz WAV.
    """
    settings = _settings()
    service = _service()
    if service.status == "error":
        raise LipsyncError(f"the service failed to load: {service.error}", code="not_ready", status=503)
    if request.mimetype == "multipart/form-data":
        inputs: dict = {}
        audio_file = request.files.get("audio")
        avatar_file = request.files.get("avatar")
        if avatar_file is not None:
            inputs["avatar_image"] = check_image(_read_upload(avatar_file, "avatar image", "invalid_image"),
                                                 settings.max_image_pixels)
            if request.endpoint == "api.submit_job":  # a job decodes it later: refuse a broken one now
                service.decode_avatar(inputs["avatar_image"])
        if audio_file is not None:
            inputs["recording"] = normalize_recording(_read_upload(audio_file, "audio file", "invalid_audio"),
                                                      settings, service.temp_root())
        elif "text" in request.form:
            _log_text(request.form["text"])
            inputs.update(text=clean_text(request.form["text"]),
                          language=request.form.get("language", DEFAULT_LANGUAGE))
        else:
            raise InvalidInputError("send an 'audio' file or a 'text' field", code="missing_input")
        return inputs
    # A JSON body holds at most the text: refuse a huge one before parsing it. (12 bytes per
    # character covers \\uXXXX escapes of surrogate pairs; plus room for the other fields.)
    request.max_content_length = min(settings.max_upload_bytes, settings.max_text_chars * 12 + 64 * 1024)
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # absurdly deep nesting: not a request we take
        body = None
    stream = request.stream
    if isinstance(stream, LimitedStream) and stream.limit == request.max_content_length and stream.is_exhausted:
        # a body without Content-Length (chunked) was cut at the limit: say so, not "invalid JSON"
        raise RequestEntityTooLarge()
    if body is None:
        raise InvalidInputError("the request body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise InvalidInputError("the JSON body must be an object with 'text' and 'language'", code="invalid_json")
    if "text" not in body:
        raise InvalidInputError("'text' is missing", code="missing_input")
    if not isinstance(body["text"], str):  # (null too: the same answer from both APIs)
        raise InvalidInputError("'text' must be a string", code="invalid_text")
    _log_text(body["text"])
    return {"text": clean_text(body["text"]), "language": body.get("language", DEFAULT_LANGUAGE)}


def _log_text(text) -> None:
    if _settings().log_text and isinstance(text, str):
        request.environ[ENV_TEXT] = clip(text, 200)


def _read_upload(file, what: str, invalid_code: str) -> bytes:
    """An uploaded file's bytes (werkzeug ``FileStorage``), within ``MAX_UPLOAD_BYTES``."""
    return read_upload(file.stream, _settings().max_upload_bytes, what, invalid_code)


# ------------------------------------------------------------------ guards
def _guard():
    """Before every request: route label, rate limit, API key, shutdown."""
    env = request.environ
    env[ENV_ROUTE] = request.url_rule.rule if request.url_rule is not None else None
    endpoint = request.endpoint
    if request.method == "OPTIONS" or endpoint is None:
        return None  # CORS preflight / unknown path: nothing to protect (404/405 follow)
    security: Security = current_app.extensions["security"]
    presented = presented_key(request.headers, request.method, request.args)
    key_id = security.key_id(presented)
    if key_id:
        env[ENV_KEY_ID] = key_id
    bucket = "write" if endpoint in WRITE_ENDPOINTS else "read" if endpoint in READ_ENDPOINTS else None
    if bucket is not None:
        identity = f"key:{key_id}" if key_id else f"ip:{request.remote_addr}"
        g.rate_limit_headers = security.limiter.hit(bucket, identity)
    if not (endpoint in PUBLIC_ENDPOINTS or (endpoint == "ops.metrics" and _settings().metrics_public)):
        security.require_key(presented, key_id)
    if endpoint in WRITE_ENDPOINTS:
        current_app.extensions["lifecycle"].check_accepting()
    return None


def _decorate(response: Response) -> Response:
    """After every request: security headers, CORS, rate-limit headers."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "application/json":
        response.headers.setdefault("Cache-Control", "no-store")
    for name, value in (getattr(g, "rate_limit_headers", None) or {}).items():
        response.headers.setdefault(name, value)
    origin = request.headers.get("Origin")
    allowed = _settings().cors_origins
    if origin and allowed and request.path.startswith("/api/") and ("*" in allowed or origin in allowed):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = CORS_ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
    if allowed and "*" not in allowed:
        response.vary.add("Origin")
    return response


# -------------------------------------------------------------------- errors
def _lipsync_error(exc: LipsyncError):
    if exc.status >= 500:  # 503s (busy, circuit open, shutting down) are expected under stress: warnings
        log.log(logging.WARNING if exc.status == 503 else logging.ERROR, "%s: %s", exc.code, exc.message)
    request.environ[ENV_ERROR_CODE] = exc.code
    headers = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    if exc.status in (400, 413, 422):  # bad input (401/429/503 have counters and gauges of their own)
        current_app.extensions["metrics"].refused.labels(exc.code).inc()
    return jsonify(exc.to_dict()), exc.status, headers


def _http_error(exc: HTTPException):
    code = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.code, (exc.name or "http_error").lower().replace(" ", "_"))
    message = exc.description or exc.name
    if exc.code == 413:
        limit = request.max_content_length or _settings().max_upload_bytes
        message = f"the request body is larger than the limit of {limit} bytes"
    request.environ[ENV_ERROR_CODE] = code
    response = jsonify({"error": message, "code": code})
    response.status_code = exc.code or 500
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected_error(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    request.environ[ENV_ERROR_CODE] = "internal_error"
    return jsonify({"error": "internal error; the server log has the details", "code": "internal_error"}), 500


# -------------------------------------------------------------------- server
def serve(application: Flask) -> None:
    """``python app.py``: a threaded server that shuts down gracefully on SIGTERM/SIGINT."""
    from werkzeug.serving import make_server

    cfg: Settings = application.config["SETTINGS"]
    lifecycle: Lifecycle = application.extensions["lifecycle"]
    tune_malloc()
    server = make_server(cfg.host, cfg.port, application, threaded=True)
    server.daemon_threads = True
    lifecycle.on_stopped(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
    interrupts = {"count": 0}

    def on_signal(signum, frame):
        interrupts["count"] += 1
        if signum == signal.SIGINT and interrupts["count"] > 1:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
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


if __name__ == "__main__":
    from lipsync.observability import configure_logging

    _cfg = Settings.from_env()
    configure_logging(_cfg.log_level, _cfg.log_format)
    serve(create_app({"SETTINGS": _cfg}))
