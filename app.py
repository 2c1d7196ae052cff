"""The web service: a thin Flask layer over ``lipsync.service.LipsyncService``.

    python app.py                      # http://localhost:3000 (PORT overrides)
    gunicorn -c gunicorn.conf.py       # production

Settings come from the environment once (``lipsync.settings.Settings``) and
live in ``app.config["SETTINGS"]``; the preloaded pipeline lives in
``app.extensions["lipsync"]``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
import time

from flask import (Blueprint, Flask, Response, current_app, jsonify, render_template, request, send_file,
                   stream_with_context, url_for)
from werkzeug.exceptions import HTTPException

from lipsync.errors import InvalidInputError, LipsyncError
from lipsync.jobs import JobQueue, JobRequest, LocalJobQueue
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from lipsync.tts.base import LANGUAGES

log = logging.getLogger("lipsync.web")

DEFAULT_LANGUAGE = "ru"

pages = Blueprint("pages", __name__)
api = Blueprint("api", __name__, url_prefix="/api")


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

    service = LipsyncService(settings)
    app.extensions["lipsync"] = service
    if app.config["LOAD_IN_BACKGROUND"]:
        threading.Thread(target=service.load, name="lipsync-load", daemon=True).start()
    else:
        service.load()
    jobs = app.config.get("JOB_QUEUE")
    if jobs is None:
        jobs = LocalJobQueue(service, settings)
        jobs.start()
        atexit.register(jobs.stop)
    app.extensions["jobs"] = jobs

    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_error_handler(LipsyncError, _lipsync_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _service() -> LipsyncService:
    return current_app.extensions["lipsync"]


def _jobs() -> JobQueue:
    return current_app.extensions["jobs"]


# --------------------------------------------------------------------- pages
@pages.get("/")
def index():
    settings: Settings = current_app.config["SETTINGS"]
    return render_template("index.html", languages=LANGUAGES, max_text_chars=settings.max_text_chars,
                           max_upload_mb=settings.max_upload_bytes // (1024 * 1024))


# ----------------------------------------------------------------------- api
@api.get("/health")
def health():
    info = _service().describe()
    return jsonify(info), 200 if info["status"] == "ready" else 503


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
    with tempfile.TemporaryDirectory(prefix="http-", dir=service.temp_root()) as tmp:
        out_path = os.path.join(tmp, "avatar.mp4")
        result = service.generate(out_path, **inputs)
        with open(out_path, "rb") as f:
            body = f.read()
    timings = result.timings
    headers = {
        "Content-Disposition": 'inline; filename="avatar.mp4"',
        "X-Processing-Time": f"{timings['total'] / 1000.0:.3f}",
        "X-Video-Duration": f"{result.duration:.3f}",
        "X-Video-Frames": str(result.frames),
        "X-Engine": result.engine,
        "Server-Timing": ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in timings.items()),
    }
    return Response(body, mimetype="video/mp4", headers=headers)


@api.post("/jobs")
def submit_job():
    inputs = _generate_inputs()  # validated: a JSON object or a multipart form
    if request.mimetype == "multipart/form-data":
        callback = request.form.get("callback_url")
    else:
        callback = request.get_json(force=True, silent=True).get("callback_url")
    job = _jobs().submit(JobRequest(**inputs, callback_url=callback))
    state = {**job.to_dict(), **_job_urls(job.id)}
    return jsonify(state), 202, {"Location": state["status_url"]}


def _job_urls(job_id: str) -> dict:
    return {"status_url": url_for("api.job_status", job_id=job_id),
            "events_url": url_for("api.job_events", job_id=job_id),
            "video_url": url_for("api.job_video", job_id=job_id),
            "stream_url": url_for("api.job_stream", job_id=job_id)}


def _job_or_404(job_id: str) -> dict:
    state = _jobs().get(job_id)
    if state is None:
        raise LipsyncError("no such job (it may have expired)", code="job_not_found", status=404)
    return state


@api.get("/jobs/<job_id>")
def job_status(job_id: str):
    return jsonify({**_job_or_404(job_id), **_job_urls(job_id)})


@api.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    _job_or_404(job_id)
    jobs = _jobs()

    def stream():
        for state in jobs.events(job_id, timeout=300, heartbeat=15):
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
    deadline = time.monotonic() + 300
    live = None
    # Wait for the first fragment (the job may still be queued or speaking).
    while state["status"] in ("queued", "running") and time.monotonic() < deadline:
        live = jobs.live_path(job_id)
        if live is not None:
            break
        time.sleep(0.05)
        state = jobs.get(job_id) or state
    if live is None:
        return job_video(job_id)
    try:
        handle = open(live, "rb")
    except FileNotFoundError:  # finished in between: the live copy is gone
        return job_video(job_id)

    def follow():
        with handle:
            while True:
                chunk = handle.read(256 * 1024)
                if chunk:
                    yield chunk
                    continue
                current = jobs.get(job_id)
                if current is None or current["status"] not in ("queued", "running"):
                    rest = handle.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.05)

    return Response(stream_with_context(follow()), mimetype="video/mp4", headers={"Cache-Control": "no-cache"})


@api.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    jobs = _jobs()
    if not jobs.cancel(job_id):
        raise LipsyncError("no such job (it may have expired)", code="job_not_found", status=404)
    state = jobs.get(job_id)
    return (jsonify(state), 200) if state is not None else ("", 204)


def _generate_inputs() -> dict:
    """The generate request as keyword arguments of ``LipsyncService.generate``.

    JSON: ``{"text", "language"}``. multipart/form-data: an ``audio`` file
    (lip-sync a recording, no TTS) or ``text``/``language`` fields, plus an
    optional ``avatar`` image replacing the preloaded one for this request.
    """
    if request.mimetype == "multipart/form-data":
        inputs: dict = {}
        audio_file = request.files.get("audio")
        avatar_file = request.files.get("avatar")
        if avatar_file is not None:
            inputs["avatar_image"] = avatar_file.read()
        if audio_file is not None:
            inputs["recording"] = audio_file.read()
        elif "text" in request.form:
            inputs.update(text=request.form["text"], language=request.form.get("language", DEFAULT_LANGUAGE))
        else:
            raise InvalidInputError("send an 'audio' file or a 'text' field", code="missing_input")
        return inputs
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise InvalidInputError("the request body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise InvalidInputError("the JSON body must be an object with 'text' and 'language'", code="invalid_json")
    if "text" not in body:
        raise InvalidInputError("'text' is missing", code="missing_input")
    return {"text": body["text"], "language": body.get("language", DEFAULT_LANGUAGE)}


# -------------------------------------------------------------------- errors
def _lipsync_error(exc: LipsyncError):
    if exc.status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    retry_after = getattr(exc, "retry_after", None)
    return jsonify(exc.to_dict()), exc.status, ({"Retry-After": str(retry_after)} if retry_after else {})


def _http_error(exc: HTTPException):
    code = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.code, (exc.name or "http_error").lower().replace(" ", "_"))
    message = exc.description or exc.name
    if exc.code == 413:
        limit = current_app.config["SETTINGS"].max_upload_bytes
        message = f"the request body is larger than the upload limit of {limit} bytes"
    return jsonify({"error": message, "code": code}), exc.code


def _unexpected_error(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify({"error": "internal error; the server log has the details", "code": "internal_error"}), 500


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    application = create_app()
    cfg: Settings = application.config["SETTINGS"]
    print(f" * Talking avatar on http://localhost:{cfg.port} (loading models in the background)", flush=True)
    application.run(host=cfg.host, port=cfg.port, threaded=True)
