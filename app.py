"""The web service: a thin Flask layer over ``lipsync.service.LipsyncService``.

    python app.py                      # http://localhost:3000 (PORT overrides)
    gunicorn -c gunicorn.conf.py       # production

Settings come from the environment once (``lipsync.settings.Settings``) and
live in ``app.config["SETTINGS"]``; the preloaded pipeline lives in
``app.extensions["lipsync"]``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from lipsync.errors import InvalidInputError, LipsyncError
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from lipsync.tts.base import LANGUAGES

log = logging.getLogger("lipsync.web")

DEFAULT_LANGUAGE = "ru"

pages = Blueprint("pages", __name__)
api = Blueprint("api", __name__, url_prefix="/api")


def create_app(config: dict | None = None) -> Flask:
    """Build the app. ``config`` may hold ``SETTINGS`` (a ``Settings``) and
    ``LOAD_IN_BACKGROUND`` (default True: serve health while models load)."""
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

    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_error_handler(LipsyncError, _lipsync_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _service() -> LipsyncService:
    return current_app.extensions["lipsync"]


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
    return jsonify(exc.to_dict()), exc.status


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
