"""What a generate request (``POST /api/generate`` and ``POST /api/jobs``) asks for, checked
before any work: the keyword arguments of ``LipsyncService.generate``.

The checks of the content itself (text, image, recording) are the library's
(``lipsync.inputs``); this module only takes them out of the HTTP request.
"""

from __future__ import annotations

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

from lipsync.errors import InvalidInputError, LipsyncError
from lipsync.inputs import (
    AVATAR,
    RECORDING,
    check_image,
    check_service_loaded,
    clean_text,
    normalize_recording,
    read_upload,
)
from lipsync.server import context
from lipsync.server.observability import ENV_KEY_ID, ENV_TEXT, clip
from lipsync.tts.base import DEFAULT_LANGUAGE

JOB_ENDPOINT = "jobs.submit"


def generate_inputs() -> dict:
    """The generate request as keyword arguments of ``LipsyncService.generate``, checked before any work.

    JSON: ``{"text", "language", "avatar_id", "idle_motion", "model"}``. multipart/form-data: an ``audio`` file
    (lip-sync a recording, no TTS) or ``text``/``language`` fields, plus an
    optional ``avatar`` image replacing the preloaded one for this request, or
    an ``avatar_id`` from the library (``GET /api/avatars``).
    Uploads are checked by content (not by name): the avatar must be a PNG or
    JPEG within ``MAX_IMAGE_PIXELS``; a recording must be a known audio
    container, is decoded once with ffmpeg forced to that demuxer and cut at
    ``MAX_AUDIO_SECONDS`` (so a tiny file that expands to hours is refused
    without being decoded whole), and goes on as 16 kHz WAV.
    """
    check_service_loaded(context.service())
    if request.mimetype == "multipart/form-data":
        return _form_inputs()
    return _json_inputs()


def callback_url() -> str | None:
    """The job's optional ``callback_url`` (checked by the job queue)."""
    if request.mimetype == "multipart/form-data":
        return request.form.get("callback_url")
    return request.get_json(force=True, silent=True).get("callback_url")


def _form_inputs() -> dict:
    settings = context.settings()
    service = context.service()
    inputs: dict = {}
    audio_file = request.files.get("audio")
    avatar_file = request.files.get("avatar")
    inputs.update(_avatar_id(request.form.get("avatar_id", _OMITTED)))
    if avatar_file is not None and inputs:
        raise InvalidInputError("give either an 'avatar' image or an 'avatar_id', not both", code="conflicting_inputs")
    if avatar_file is not None:
        inputs["avatar_image"] = check_image(read_request_file(avatar_file, AVATAR),
                                             settings.max_image_pixels)
        if request.endpoint == JOB_ENDPOINT:  # a job decodes it later: refuse a broken one now
            service.check_avatar(inputs["avatar_image"])  # small, and at most AVATAR_DECODES at once
    if audio_file is not None:
        inputs["recording"] = normalize_recording(read_request_file(audio_file, RECORDING),
                                                  settings, service.temp_root())
    elif "text" in request.form:
        _log_text(request.form["text"])
        inputs.update(text=clean_text(request.form["text"]),
                      **_language(request.form.get("language", _OMITTED), request.form.get("allow_mismatch", _OMITTED)))
    else:
        raise InvalidInputError("send an 'audio' file or a 'text' field", code="missing_input")
    inputs.update(_idle_motion(request.form.get("idle_motion", _OMITTED)))
    inputs.update(model_input(request.form.get("model", _OMITTED)))
    return inputs


def _json_inputs() -> dict:
    settings = context.settings()
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
    _log_text(body["text"])  # clean_text refuses a non-string (null too: the same answer from both APIs)
    return {"text": clean_text(body["text"]), **_language(body.get("language", _OMITTED),
                                                                body.get("allow_mismatch", _OMITTED)),
            **_avatar_id(body.get("avatar_id", _OMITTED)), **_idle_motion(body.get("idle_motion", _OMITTED)),
            **model_input(body.get("model", _OMITTED))}


_OMITTED = object()  # no "language" key at all (null is a value, and refused like any non-language)
_FORM_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _language(language, allow_mismatch) -> dict:
    """``language`` and ``allow_mismatch`` for the service. An omitted language is today's
    default, spoken whatever the text's script (as clients that never send one always got);
    an explicit one (or ``auto``) is checked against the text unless ``allow_mismatch``."""
    allow_mismatch = _boolean("allow_mismatch", allow_mismatch)
    if language is _OMITTED:
        return {"language": DEFAULT_LANGUAGE, "allow_mismatch": allow_mismatch is _OMITTED or allow_mismatch}
    return {"language": language, "allow_mismatch": allow_mismatch is not _OMITTED and allow_mismatch}


def _log_text(text) -> None:
    if context.server_settings().log_text and isinstance(text, str):
        request.environ[ENV_TEXT] = clip(text, 200)


def read_request_file(file, kind: tuple[str, str]) -> bytes:
    """An uploaded file's bytes (werkzeug ``FileStorage``), within ``MAX_UPLOAD_BYTES``."""
    return read_upload(file.stream, context.settings().max_upload_bytes, kind)


def _boolean(name: str, value):
    """A JSON boolean or a form's word for one (exactly the words the API document lists) as a
    bool; ``_OMITTED`` stays as it is; anything else is a 400."""
    if isinstance(value, str):
        value = _FORM_BOOLEANS.get(value, value)
    if value is not _OMITTED and not isinstance(value, bool):
        raise InvalidInputError(f"'{name}' must be true or false", code="invalid_input")
    return value


def _idle_motion(value) -> dict:
    """``idle_motion`` as a bool, or nothing (omitted or null): the server's default."""
    if value is _OMITTED or value is None:
        return {}
    return {"idle_motion": _boolean("idle_motion", value)}


def model_input(value=_OMITTED) -> dict:
    """``model`` (a form field or JSON key) checked now: 400 ``unknown_model`` listing the loaded
    ones; nothing when omitted (the avatar's preferred model, else the default)."""
    if value is _OMITTED or value is None or value == "":
        return {}
    models = context.service().models
    if models is None:  # still loading (a job may wait for it): checked when it runs
        if not isinstance(value, str):
            raise InvalidInputError("'model' must be a string", code="unknown_model")
        return {"model": value}
    return {"model": models.resolve(value)}


def _avatar_id(value) -> dict:
    """``avatar_id`` and the owner it is looked up for, checked now (400 ``unknown_avatar``):
    a job must not fail later for a typo, and one key never uses another key's avatar."""
    if value is _OMITTED or value is None or value == "":
        return {}
    if not isinstance(value, str):
        raise InvalidInputError("'avatar_id' must be a string", code="invalid_input")
    owner = request.environ.get(ENV_KEY_ID)
    try:
        context.service().avatars.get(value, owner)
    except LipsyncError as exc:
        if exc.code != "unknown_avatar":
            raise
        raise InvalidInputError(f"no avatar with id {value!r} (GET /api/avatars lists yours)",
                                code="unknown_avatar") from None
    return {"avatar_id": value, "owner": owner}
