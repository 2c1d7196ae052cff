"""The web service: a thin Flask layer over ``lipsync.service.LipsyncService``.

    python app.py                      # http://localhost:3000 (PORT overrides)
    gunicorn -c gunicorn.conf.py       # production

Settings come from the environment once (``lipsync.settings.Settings``) and
live in ``app.config["SETTINGS"]``; the preloaded pipeline lives in
``app.extensions["lipsync"]``, the job queue in ``app.extensions["jobs"]``.

Besides the routes this module holds the request guards (README "Security"):
API keys, per-client rate limits, CORS, security headers, upload checks by
content, and the graceful shutdown (README "Operations").
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import wave

from flask import (Blueprint, Flask, Response, current_app, g, jsonify, render_template, request, send_file,
                   stream_with_context, url_for)
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wsgi import LimitedStream

from lipsync.errors import InvalidInputError, LipsyncError, PayloadTooLargeError
from lipsync.ffmpeg import run_ffmpeg
from lipsync.jobs import JobQueue, JobRequest, LocalJobQueue
from lipsync.observability import (ENV_ERROR_CODE, ENV_JOB_ID, ENV_KEY_ID, ENV_ROUTE, ENV_TEXT, METRICS_CONTENT_TYPE,
                                   Metrics, RequestObserver, clip, gauge, job_log, job_log_fields)
from lipsync.openapi import build_openapi
from lipsync.service import LipsyncService
from lipsync.settings import Settings, parse_rate_limit
from lipsync.tts.base import LANGUAGES
from lipsync.video import decode_image

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
    _register_state_metrics(metrics, service, jobs, slots, lifecycle)

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


class HttpError(LipsyncError):
    """A refusal of the web layer, optionally with ``Retry-After`` and other headers."""

    def __init__(self, message: str, *, code: str, status: int, retry_after: int | None = None,
                 headers: dict | None = None):
        super().__init__(message, code=code, status=status)
        self.retry_after = None if retry_after is None else max(1, int(retry_after))
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return data


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
        with tempfile.TemporaryDirectory(prefix=f"http-{PROCESS_TAG}-", dir=service.temp_root()) as tmp:
            out_path = os.path.join(tmp, "avatar.mp4")
            result = service.generate(out_path, **inputs)
            with open(out_path, "rb") as f:
                body = f.read()
    current_app.extensions["metrics"].observe_stages(result.timings, "sync")
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
    stopped = current_app.extensions["lifecycle"].stopped
    deadline = time.monotonic() + 300
    live = None
    # Wait for the first fragment (the job may still be queued or speaking).
    while state["status"] in ("queued", "running") and time.monotonic() < deadline and not stopped.is_set():
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
                decode_image(inputs["avatar_image"])
        if audio_file is not None:
            inputs["recording"] = normalize_recording(_read_upload(audio_file, "audio file", "invalid_audio"),
                                                      settings, service.temp_root())
        elif "text" in request.form:
            _check_tts_circuit(service)
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
    _check_tts_circuit(service)
    _log_text(body["text"])
    return {"text": clean_text(body["text"]), "language": body.get("language", DEFAULT_LANGUAGE)}


def _log_text(text) -> None:
    if _settings().log_text and isinstance(text, str):
        request.environ[ENV_TEXT] = clip(text, 200)


def _check_tts_circuit(service: LipsyncService) -> None:
    """A text request while the remote TTS circuit is open: 503 ``tts_unavailable`` now, before
    any work (and before a job is queued only to fail)."""
    breaker = getattr(service.tts, "breaker", None)
    if breaker is not None:
        breaker.check()


def _read_upload(file, what: str, invalid_code: str) -> bytes:
    limit = _settings().max_upload_bytes
    data = file.stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"the {what} is larger than the limit of {limit} bytes", code="upload_too_large")
    if not data:
        raise InvalidInputError(f"the {what} is empty", code=invalid_code)
    return data


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text):
    """Text as the TTS may receive it: control characters become spaces; lone surrogates
    (possible in JSON, not encodable as UTF-8) are refused. Non-strings pass through for
    the service's own ``invalid_text`` check."""
    if not isinstance(text, str):
        return text
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise InvalidInputError("'text' contains invalid Unicode (a lone surrogate)", code="invalid_text")
    return _CONTROL_CHARS.sub(" ", text)


def sniff_image(data: bytes) -> str | None:
    """``png`` or ``jpeg`` from the file's first bytes, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return None


def image_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF marker, without decoding; None if not found."""
    if kind == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None  # a marker was expected here: not a well-formed JPEG
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA or length < 2:  # image data before any frame header
            return None
        i += 2 + length
    return None


def check_image(data: bytes, max_pixels: int) -> bytes:
    """``data`` if it is a PNG/JPEG whose header says at most ``max_pixels``; else a 400."""
    kind = sniff_image(data)
    if kind is None:
        raise InvalidInputError("the avatar must be a PNG or JPEG image", code="invalid_image")
    size = image_size(data, kind)
    if size is None or size[0] == 0 or size[1] == 0:
        raise InvalidInputError(f"the avatar is not a readable {kind.upper()} image", code="invalid_image")
    width, height = size
    if width * height > max_pixels:
        raise InvalidInputError(f"the image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted",
                                code="image_too_large")
    return data


def sniff_audio(data: bytes) -> str | None:
    """The ffmpeg demuxer for an upload, from its first bytes; None for anything not audio/video we take."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # webm, mka, mkv
    if head[4:8] == b"ftyp":
        return "mov"       # mp4, m4a, mov, 3gp
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:6] == b"#!AMR\n":
        return "amr"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x3
        if layer == 0 and head[1] & 0xF6 == 0xF0:
            return "aac"   # ADTS
        if layer != 0 and (head[1] >> 3) & 0x3 != 1 and len(head) >= 3 and head[2] >> 4 not in (0, 15):
            return "mp3"   # MPEG audio frame: valid version and bitrate index
    return None


def normalize_recording(data: bytes, settings: Settings, temp_root: str) -> bytes:
    """An upload as 16 kHz mono WAV bytes, refusing what is not audio or too long before the render."""
    demuxer = sniff_audio(data)
    if demuxer is None:
        raise InvalidInputError("the audio file is not in a supported format (WAV, MP3, AAC, OGG/Opus, FLAC, "
                                "M4A/MP4, WebM/MKV, AIFF, AMR)", code="invalid_audio")
    limit = settings.max_audio_seconds
    with tempfile.TemporaryDirectory(prefix=f"up-{PROCESS_TAG}-", dir=temp_root) as tmp:
        path = os.path.join(tmp, "upload")
        with open(path, "wb") as f:
            f.write(data)
        # -f: the demuxer we sniffed, never ffmpeg's own guess (no playlists, no concat lists);
        # -t: stop decoding just past the limit.
        pcm = run_ffmpeg(["-protocol_whitelist", "file", "-f", demuxer, "-i", path, "-t", f"{limit + 0.1:.3f}",
                          "-vn", "-sn", "-dn", "-ac", "1", "-ar", "16000", "-f", "s16le", "-acodec", "pcm_s16le",
                          "pipe:1"], timeout=min(settings.ffmpeg_timeout, 120.0),
                         error=lambda message: InvalidInputError(message, code="invalid_audio"),
                         what="could not decode the audio")
    samples = len(pcm) // 2
    if samples == 0:
        raise InvalidInputError("the audio contains no sound samples", code="invalid_audio")
    if samples > limit * 16000:
        raise PayloadTooLargeError(f"the audio lasts more than {limit:.0f} s, the limit", code="audio_too_long")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm[: samples * 2])
    return out.getvalue()


# --------------------------------------------------------- temporary files
def _process_tag() -> str:
    """``<pid>.<start time>``: names this process's temporary folders, unique even across container
    restarts where the pid repeats."""
    return f"{os.getpid()}.{_start_ticks(os.getpid()) or 0}"


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


PROCESS_TAG = _process_tag()
_TEMP_NAME = re.compile(r"(?:http|up)-(\d+)\.(\d+)-")


def sweep_stale_temp(root: str) -> int:
    """Remove per-request folders left by processes that died (SIGKILL, power loss); returns how many.

    Folders of live processes (other gunicorn workers sharing the folder) are kept."""
    removed = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None:
            continue
        pid, ticks = int(match.group(1)), int(match.group(2))
        if pid == os.getpid() and f"{pid}.{ticks}" == PROCESS_TAG:
            continue
        alive = _start_ticks(pid)
        if alive is not None and (ticks == 0 or alive == ticks):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed += 1
    if removed:
        log.warning("removed %d temporary folder(s) left by stopped processes", removed)
    return removed


# ------------------------------------------------------------------ guards
class Security:
    """API keys and rate limits of one app."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        # compare SHA-256 digests: equal lengths, so compare_digest leaks nothing, not even the length
        self._keys = [(hashlib.sha256(k.encode()).digest(), hashlib.sha256(k.encode()).hexdigest()[:12])
                      for k in settings.api_keys]
        if any(len(k) < 16 for k in settings.api_keys):
            log.warning("API_KEYS has keys shorter than 16 characters; use long random keys")
        self.limiter = RateLimiter(settings, metrics)

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def presented_key(self) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip() or None
        key = request.headers.get("X-API-Key")
        if key:
            return key.strip()
        if request.method in ("GET", "HEAD"):  # EventSource and <video> cannot send headers
            return request.args.get("api_key") or None
        return None

    def key_id(self, presented: str | None) -> str | None:
        """The id (hash prefix) of the configured key equal to ``presented``; every key is compared."""
        if presented is None or not self._keys:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key_digest, key_id in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = key_id
        return found


class RateLimiter:
    """Moving-window limits per client over ``limits`` storage: in memory, or Redis (shared by
    processes and hosts) when ``RATE_LIMIT_STORAGE_URI``/``REDIS_URL`` is set.

    If the storage fails (Redis down) requests are let through and the failure is logged and
    counted (``lipsync_rate_limit_storage_errors_total``): the limiter protects, never takes the
    service down with it."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.metrics = metrics
        self.buckets = {"write": parse_rate_limit(settings.rate_limit, "rate_limit"),
                        "read": parse_rate_limit(settings.rate_limit_read, "rate_limit_read")}
        self.strategy = None
        self._last_error_log = 0.0
        if any(self.buckets.values()):
            from limits.storage import storage_from_string
            from limits.strategies import MovingWindowRateLimiter

            uri = settings.rate_limit_storage_uri
            options = {} if uri.startswith("memory") else {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
            self.storage = storage_from_string(uri, **options)
            self.strategy = MovingWindowRateLimiter(self.storage)

    def hit(self, bucket: str, identity: str) -> dict | None:
        """Count one request; raise 429 when over a limit. Returns the X-RateLimit-* values."""
        items = self.buckets.get(bucket) or []
        if not items or self.strategy is None:
            return None
        try:
            headers = None
            for item in items:
                if not self.strategy.hit(item, "lipsync", bucket, identity):
                    stats = self.strategy.get_window_stats(item, "lipsync", bucket, identity)
                    retry = max(1, math.ceil(stats.reset_time - time.time()))
                    self.metrics.rate_limited.labels(bucket).inc()
                    raise HttpError(f"too many requests: the limit is {item}; retry in {retry} s",
                                    code="rate_limited", status=429, retry_after=retry,
                                    headers={"X-RateLimit-Limit": str(item.amount), "X-RateLimit-Remaining": "0",
                                             "X-RateLimit-Reset": str(math.ceil(stats.reset_time))})
                if headers is None:
                    stats = self.strategy.get_window_stats(item, "lipsync", bucket, identity)
                    headers = {"X-RateLimit-Limit": str(item.amount), "X-RateLimit-Remaining": str(stats.remaining),
                               "X-RateLimit-Reset": str(math.ceil(stats.reset_time))}
            return headers
        except HttpError:
            raise
        except Exception as exc:  # noqa: BLE001 - storage down: let the request through
            self.metrics.rate_limit_errors.inc()
            now = time.monotonic()
            if now - self._last_error_log > 60:
                self._last_error_log = now
                log.error("rate-limit storage failed, requests are not limited: %s: %s", type(exc).__name__, exc)
            return None


def _guard():
    """Before every request: route label, rate limit, API key, shutdown."""
    env = request.environ
    env[ENV_ROUTE] = request.url_rule.rule if request.url_rule is not None else None
    endpoint = request.endpoint
    if request.method == "OPTIONS" or endpoint is None:
        return None  # CORS preflight / unknown path: nothing to protect (404/405 follow)
    security: Security = current_app.extensions["security"]
    settings = _settings()
    key_id = security.key_id(security.presented_key())
    if key_id:
        env[ENV_KEY_ID] = key_id
    bucket = "write" if endpoint in WRITE_ENDPOINTS else "read" if endpoint in READ_ENDPOINTS else None
    if bucket is not None:
        identity = f"key:{key_id}" if key_id else f"ip:{request.remote_addr}"
        g.rate_limit_headers = security.limiter.hit(bucket, identity)
    public = endpoint in PUBLIC_ENDPOINTS or (endpoint == "ops.metrics" and settings.metrics_public)
    if security.keys_required and not public and key_id is None:
        security.metrics.auth_failures.inc()
        presented = security.presented_key() is not None
        challenge = 'Bearer realm="lipsync"' + (', error="invalid_token"' if presented else "")
        raise HttpError("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                        if not presented else "the API key is not valid", code="unauthorized", status=401,
                        headers={"WWW-Authenticate": challenge})
    if endpoint in WRITE_ENDPOINTS and current_app.extensions["lifecycle"].stopping.is_set():
        raise HttpError("the server is shutting down; send the request again in a moment", code="shutting_down",
                        status=503, retry_after=10)
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


class RenderSlots:
    """At most ``count`` synchronous renders at once; a request waits up to ``wait`` s for a slot,
    then gets 503 ``busy``. (Jobs have their own queue and worker.)"""

    def __init__(self, count: int, wait: float):
        self.count = count
        self.wait = wait
        self._semaphore = threading.BoundedSemaphore(count)
        self._cond = threading.Condition()
        self.active = 0

    @contextlib.contextmanager
    def slot(self):
        if not self._semaphore.acquire(timeout=self.wait):
            raise HttpError(f"the server is busy with {self.count} videos; try again shortly or use /api/jobs",
                            code="busy", status=503, retry_after=5)
        with self._cond:
            self.active += 1
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                idle = self.active == 0
                self._cond.notify_all()
            self._semaphore.release()
            if idle:
                release_memory()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def _load_malloc_trim():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_malloc_trim = _load_malloc_trim()


def tune_malloc(arenas: int = 2) -> None:
    """Limit glibc to ``arenas`` malloc arenas (unless MALLOC_ARENA_MAX is set).

    A threaded server otherwise gets up to 8 arenas per core, one per busy thread, each keeping
    the frame buffers it once held: the process stays far above its idle size after a burst.
    Called by the entry points (``python app.py``, gunicorn workers), not by ``create_app``."""
    if _malloc_trim is None or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass
_trim_lock = threading.Lock()


def release_memory() -> None:
    """Give the memory freed by a finished render back to the OS.

    A render allocates and frees hundreds of MB of frame buffers; glibc keeps freed memory in its
    heaps (and raises its mmap threshold), so without this the process stays at its peak size
    long after the load is gone. ``malloc_trim(0)`` returns every free page; it takes about a
    millisecond and runs only when no render is active."""
    if _malloc_trim is not None and _trim_lock.acquire(blocking=False):
        try:
            _malloc_trim(0)
        finally:
            _trim_lock.release()


class Lifecycle:
    """Graceful shutdown. ``begin()`` (on SIGTERM): new generate/job requests get 503
    ``shutting_down`` and health 503; the running job and sync renders get ``grace`` seconds to
    finish; then the queue stops (a job still running is failed with code ``interrupted``) and
    the ``on_stopped`` callbacks run (stop the HTTP server)."""

    def __init__(self, jobs: JobQueue, slots: RenderSlots, grace: float):
        self.jobs = jobs
        self.slots = slots
        self.grace = grace
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list = []
        self._thread: threading.Thread | None = None

    def on_stopped(self, callback) -> None:
        self._callbacks.append(callback)

    def begin(self, reason: str = "shutdown", grace: float | None = None) -> None:
        """Start the shutdown (once; later calls do nothing). ``grace`` overrides the setting
        (0: interrupt the running job at once)."""
        with self._lock:
            if self._thread is not None:
                return
            grace = self.grace if grace is None else grace
            self.stopping.set()
            log.info("shutting down (%s): no new work; %.0f s for the running work", reason, grace)
            self._thread = threading.Thread(target=self._drain, args=(grace,), name="lipsync-shutdown", daemon=True)
            self._thread.start()

    def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        try:
            job_done = self.jobs.drain(grace)
            renders_done = self.slots.wait_idle(max(0.0, deadline - time.monotonic()))
            if not job_done:
                log.warning("shutdown: the running job did not finish within %.0f s; it is failed as interrupted",
                            grace)
            if not renders_done:
                log.warning("shutdown: %d synchronous render(s) still running", self.slots.active)
            self.jobs.stop(timeout=15.0)
        except Exception:  # noqa: BLE001
            log.exception("shutdown failed")
        finally:
            self.stopped.set()
            log.info("shutdown complete")
            for callback in self._callbacks:
                try:
                    callback()
                except Exception:  # noqa: BLE001
                    log.exception("shutdown callback failed")

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)


# ----------------------------------------------------------------- metrics
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def _register_state_metrics(metrics: Metrics, service: LipsyncService, jobs, slots: RenderSlots,
                            lifecycle: Lifecycle) -> None:
    def state():
        info = service.describe()
        yield gauge("lipsync_ready", "1 when models are loaded and requests are served", 1 if info["status"] == "ready" else 0)
        yield gauge("lipsync_engine_info", "The lip-sync engine, device and TTS in use", 1,
                    labels={"engine": info.get("engine") or "", "device": info.get("device") or "",
                            "version": info.get("version") or "", "checkpoint": os.path.basename(info.get("checkpoint") or ""),
                            "tts_provider": info.get("tts_provider") or "", "face_detector": info.get("face_detector") or ""})
        breaker = getattr(service.tts, "breaker", None)
        if breaker is not None:
            yield gauge("lipsync_tts_circuit_state", "Remote TTS circuit breaker: 0 closed, 1 half-open, 2 open",
                        _BREAKER_STATES.get(breaker.state, 0))
            yield gauge("lipsync_tts_circuit_opened", "How often the remote TTS circuit breaker opened",
                        breaker.opened_count)
        store = getattr(jobs, "store", None)
        if store is not None and hasattr(store, "status_counts"):
            counts = store.status_counts()
            yield gauge("lipsync_jobs", "Jobs known to the queue, by status", samples=[
                ({"status": status}, n) for status, n in counts.items()])
            yield gauge("lipsync_queue_depth", "Jobs waiting to run", counts.get("queued", 0))
        yield gauge("lipsync_sync_renders_active", "Synchronous /api/generate renders running", slots.active)
        yield gauge("lipsync_sync_render_slots", "Synchronous renders allowed at once", slots.count)
        yield gauge("lipsync_shutting_down", "1 once a graceful shutdown began", 1 if lifecycle.stopping.is_set() else 0)

    metrics.add_state(state)


def _job_ended(metrics: Metrics, state: dict) -> None:
    """The queue's on_job_end: one ``job`` log line and the job metrics."""
    release_memory()
    code = (state.get("error") or {}).get("code") or ""
    metrics.jobs_finished.labels(state.get("status") or "", code).inc()
    if state.get("status") == "done":
        metrics.observe_stages(state.get("timings"), "job")
    fields = job_log_fields(state)
    level = logging.WARNING if state.get("status") == "failed" else logging.INFO
    job_log.log(level, "job %s %s", state.get("id"), state.get("status"), extra=fields)


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
