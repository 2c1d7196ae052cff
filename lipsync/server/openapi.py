"""The OpenAPI 3 document of the HTTP API, served at ``GET /api/openapi.json``.

Built from the ``Settings`` of the running server, so the limits it states
(``maxLength`` of ``text``, the languages, whether an API key is needed) are
the ones enforced. ``tests/test_openapi_fuzz.py`` checks it against the real
routes and fuzzes a live server with it (Schemathesis).
"""

from __future__ import annotations

from copy import deepcopy

from lipsync.jobs.store import STATUSES
from lipsync.jobs.webhooks import MAX_URL_LENGTH
from lipsync.server.settings import ServerSettings, parse_rate_limit
from lipsync.settings import Settings
from lipsync.tts.base import LANGUAGE_CHOICES, LANGUAGES

JOB_ID_PATTERN = "^[0-9a-f]{32}$"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, *, retry_after: bool | None = None, www_authenticate: bool = False,
           extra_headers: dict | None = None) -> dict:
    headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if retry_after is not None:
        headers["Retry-After"] = {**_header("Retry-After"), "required": retry_after}
    if www_authenticate:
        headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
    headers.update(extra_headers or {})
    return {"description": description, "headers": headers,
            "content": {"application/json": {"schema": _ref("Error")}}}


_IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
                    "description": "Any unique string per intended job (a UUID): a retry with the same key "
                                   "and body gets the same job, per API key, while that job's record lives."}


def _header(name: str) -> dict:
    return {"$ref": f"#/components/headers/{name}"}


def _ok(description: str, media: dict, headers: dict | None = None) -> dict:
    return {"description": description,
            "headers": {"X-Request-ID": _header("X-Request-ID"), **(headers or {})},
            "content": media}


def build_openapi(settings: Settings, server: ServerSettings) -> dict:
    """The OpenAPI 3.0 document for a server running with ``settings`` and ``server``."""
    return _Document(settings, server).build()


class _Document:
    """The document's parts, each from the settings that shape it."""

    def __init__(self, settings: Settings, server: ServerSettings):
        self.settings = settings
        self.server = server
        self.keys = bool(server.api_keys)
        self.write_limit = parse_rate_limit(server.rate_limit)
        self.read_limit = parse_rate_limit(server.rate_limit_read)

    def build(self) -> dict:
        document = {
            "openapi": "3.0.3",
            "info": {"title": "Talking avatar", "version": "1",
                     "description": "Text (Russian, Kazakh, English) or a recording in, an MP4 of the avatar "
                                    "speaking it out. Every response carries X-Request-ID; errors are JSON "
                                    "`{\"error\", \"code\"}`; 429 and most 503 answers carry Retry-After."},
            "servers": [{"url": "/"}],
            "tags": [{"name": n} for n in ("page", "generate", "jobs", "avatar", "operations")],
            "paths": {**self.page_paths(), **self.generate_paths(), **self.job_paths(), **self.avatar_paths(),
                      **self.session_paths(), **self.ops_paths()},
            "components": {"schemas": _schemas(), "headers": _HEADERS},
        }
        if self.keys:
            document["components"]["securitySchemes"] = _SECURITY_SCHEMES
        return deepcopy(document)  # the shared parts below become independent copies

    # ------------------------------------------------------------ helpers
    def op(self, summary: str, responses: dict, *, tags: list[str], public: bool = False, get: bool = False,
           **extra) -> dict:
        operation = {"summary": summary, "tags": tags, "responses": responses, **extra}
        if self.keys:
            # GETs also take ?api_key= (EventSource and <video> cannot send headers)
            protected = [{"bearerAuth": []}, {"apiKeyHeader": []}] + ([{"apiKeyQuery": []}] if get else [])
            operation["security"] = [] if public else protected
        return operation

    def guarded(self, responses: dict, *, bucket: str, write: bool) -> dict:
        """Add the refusals every protected operation can answer."""
        responses = dict(responses)
        if self.keys:
            responses["401"] = _UNAUTHORIZED
        limits = self.write_limit if bucket == "write" else self.read_limit
        if limits:
            responses["429"] = _error(
                f"Rate limited (code `rate_limited`, limit {'; '.join(str(i) for i in limits)} per client)"
                + (" or the job queue is full (code `queue_full`)." if write else "."), retry_after=True)
        elif write:
            responses["429"] = _error("The job queue is full (code `queue_full`).", retry_after=True)
        return responses

    def read_op(self, summary: str, responses: dict, *, get: bool = True) -> dict:
        """A jobs operation under the read rate limit."""
        return self.op(summary, self.guarded(responses, bucket="read", write=False), tags=["jobs"], get=get)

    def text_schema(self) -> dict:
        max_chars = self.settings.max_text_chars
        return {"type": "string", "minLength": 1, "maxLength": max_chars,
                "description": f"What the avatar says: at most {max_chars} characters and not only spaces. "
                               "Control characters are read as spaces; lone surrogates are refused."}

    def generate_body(self, with_callback: bool) -> dict:
        s = self.settings
        upload_note = (f"Uploads: at most {s.max_upload_bytes} bytes each. `audio`: WAV, MP3, AAC, OGG/Opus, "
                       f"FLAC, M4A/MP4, WebM/MKV, AIFF or AMR, recognised by content, at most "
                       f"{s.max_audio_seconds:g} s. `avatar`: PNG or JPEG with a face, at most "
                       f"{s.max_image_pixels} pixels.")
        text, language = self.text_schema(), _language_schema()
        json_props = {"text": text, "language": language, "allow_mismatch": _ALLOW_MISMATCH_SCHEMA,
                      "avatar_id": _AVATAR_ID_SCHEMA, "idle_motion": _IDLE_MOTION_SCHEMA, "model": _MODEL_SCHEMA}
        form_props = {"audio": {"type": "string", "format": "binary",
                                "description": "A recording to lip-sync instead of speaking `text`."},
                      "avatar": {"type": "string", "format": "binary",
                                 "description": "An image that replaces the preloaded avatar for this request."},
                      "avatar_id": _AVATAR_ID_SCHEMA, "text": text, "language": language, "model": _MODEL_SCHEMA,
                      "idle_motion": {**_IDLE_MOTION_SCHEMA, "type": "string",
                                      "enum": ["true", "false", "1", "0", "yes", "no"]},
                      "allow_mismatch": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]}}
        if with_callback:
            json_props["callback_url"] = _CALLBACK_SCHEMA
            form_props["callback_url"] = _CALLBACK_SCHEMA
        return {"required": True, "description": upload_note, "content": {
            "application/json": {"schema": {"type": "object", "required": ["text"], "properties": json_props},
                                 "example": {"text": "Привет! Я ваш виртуальный помощник.", "language": "ru"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": form_props,
                                               "anyOf": [{"required": ["audio"]}, {"required": ["text"]}]},
                                    "encoding": {"audio": {"contentType": "application/octet-stream"},
                                                 "avatar": {"contentType": "image/png, image/jpeg"}}}}}

    # -------------------------------------------------------------- paths
    def page_paths(self) -> dict:
        return {
            "/": {"get": self.op("The page: text box, language, avatar preview, player.", {
                "200": _ok("HTML page.", {"text/html": {"schema": {"type": "string"}}})}, tags=["page"],
                public=True)},
            "/static/{filename}": {"get": self.op("Static files of the page.", {
                "200": _ok("The file.", _binary("*/*")),
                "304": {"description": "Not modified.", "headers": {"X-Request-ID": _header("X-Request-ID")}},
                "404": _error("No such file (code `not_found`)."),
            }, tags=["page"], public=True, parameters=[
                {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"},
                 "example": "app.js"}])},
            "/api/avatar": {"get": self.op("The preloaded avatar at output size.", {
                "200": _ok("JPEG image.", _binary("image/jpeg")),
                "503": _error("Not loaded yet (code `not_ready`)."),
            }, tags=["avatar"], public=True)},
        }

    def generate_paths(self) -> dict:
        video_headers = {name: _header(name) for name in
                         ("X-Processing-Time", "X-Video-Duration", "X-Video-Frames", "X-Engine", "Server-Timing",
                          "X-Speech-Language")}
        return {
            "/api/generate": {"post": self.op("Make the MP4 now and answer with it (synchronous).", self.guarded({
                "200": _ok("The MP4 (H.264 + AAC, faststart).", _binary("video/mp4"), video_headers),
                **_WRITE_ERRORS,
                "422": _error("No face in the avatar (code `no_face`)."),
                "500": _error("The encoder failed (code `media_error`) or an internal error (`internal_error`)."),
                "502": _error("The remote TTS answered an error or no audio (code `tts_failed`)."),
            }, bucket="write", write=False), tags=["generate"], requestBody=self.generate_body(False))},
            "/api/jobs": {"post": self.op("Queue a video; follow it by id.", self.guarded({
                "202": _ok("Queued (or, for a retry with the same `Idempotency-Key`, the job it made).",
                           {"application/json": {"schema": _ref("Job")}}, {"Location": _header("Location")}),
                **_WRITE_ERRORS,
                "409": _error("The first request with this `Idempotency-Key` is still being submitted "
                              "(code `idempotency_key_in_flight`).", retry_after=True),
                "422": _error("This `Idempotency-Key` was used for another request (code `idempotency_key_reused`)."),
            }, bucket="write", write=True), tags=["jobs"], requestBody=self.generate_body(True),
                parameters=[_IDEMPOTENCY_KEY])},
        }

    def job_paths(self) -> dict:
        not_found = _error("No such job (unknown, expired, deleted or not a job id): code `job_not_found`, "
                           "or `not_found` for a path that is no route.")
        range_header = {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "A byte range (`bytes=0-1023`) for seeking."}
        events = {"type": "object", "required": ["data"], "description": "One event.",
                  "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                          "contentSchema": _ref("JobState")},
                                 "event": {"type": "string"}, "id": {"type": "string"}}}
        return {
            "/api/jobs/{job_id}": {
                "parameters": [_JOB_ID_PARAM],
                "get": self.read_op("A job's state.", {
                    "200": _ok("The state.", {"application/json": {"schema": _ref("Job")}}), "404": not_found}),
                "delete": self.read_op("Cancel a queued/running job; delete an ended one (its record and files).", {
                    "200": _ok("Cancelled: the final state.", {"application/json": {"schema": _ref("JobState")}}),
                    "204": {"description": "Deleted.", "headers": {"X-Request-ID": _header("X-Request-ID")}},
                    "404": not_found}, get=False),
            },
            "/api/jobs/{job_id}/events": {
                "parameters": [_JOB_ID_PARAM],
                "get": self.read_op("Server-Sent Events: the state, then every change, until the job ends.", {
                    "200": _ok("One event per state change: `data: <JobState JSON>`; `: keep-alive` comments "
                               "in between. The stream ends after a final state.",
                               {"text/event-stream": {"schema": events}}),
                    "404": not_found}),
            },
            "/api/jobs/{job_id}/video": {
                "parameters": [_JOB_ID_PARAM, range_header],
                "get": self.read_op("The finished MP4 (Range requests supported).", {
                    "200": _ok("The MP4.", _binary("video/mp4"), {"Accept-Ranges": _header("Accept-Ranges")}),
                    "206": _ok("The requested range.", _binary("video/mp4"),
                               {"Content-Range": _header("Content-Range")}),
                    "404": not_found,
                    "409": _error("Not done yet (code `job_not_done`)."),
                    "416": _error("The range is outside the file (code `requested_range_not_satisfiable`)."),
                }),
            },
            "/api/jobs/{job_id}/stream": {
                "parameters": [_JOB_ID_PARAM],
                "get": self.read_op("The MP4 while it is being made (fragmented, chunked); the finished file "
                                    "once done.", {
                                        "200": _ok("Fragmented MP4.", _binary("video/mp4")),
                                        "404": not_found,
                                        "409": _error("The job failed or was cancelled (code `job_not_done`)."),
                                    }),
            },
        }

    def avatar_paths(self) -> dict:
        s = self.settings
        not_found = _error("No such avatar for this API key (code `unknown_avatar`).")

        def avatar_op(summary: str, responses: dict, *, bucket: str = "read", get: bool = True, **extra) -> dict:
            return self.op(summary, self.guarded(responses, bucket=bucket, write=False), tags=["avatar"], get=get,
                           **extra)

        upload = {"required": True, "description": f"`avatar`: a PNG or JPEG showing exactly one face, at most "
                                                   f"{s.max_upload_bytes} bytes and {s.max_image_pixels} pixels.",
                  "content": {"multipart/form-data": {
                      "schema": {"type": "object", "required": ["avatar"], "properties": {
                          "avatar": {"type": "string", "format": "binary", "description":
                                     "A PNG/JPEG photo, or a video clip (MP4, MOV, WebM, MKV, AVI; at most "
                                     "`MAX_AVATAR_SECONDS`): played forwards then backwards under any speech, "
                                     "at its own frame rate when that is 24-60 fps."},
                          "name": {"type": "string", "maxLength": 80, "description": "A label for pickers."},
                          "model": {**_MODEL_SCHEMA, "description": "The avatar's preferred model: requests on it "
                                    "that name none get it."}}},
                      "encoding": {"avatar": {"contentType": "image/png, image/jpeg, video/*"}}}}}
        return {
            "/api/avatars": {
                "get": avatar_op("The avatars this API key may use: `default` (the preloaded one), then its own.", {
                    "200": _ok("The list.", {"application/json": {"schema": {
                        "type": "object", "required": ["avatars"],
                        "properties": {"avatars": {"type": "array", "items": _ref("Avatar")}}}}}),
                    "503": _error("Not loaded yet (code `not_ready`)."),
                }),
                "post": avatar_op("Add an avatar: its face is found and it is prepared once, now; then use its "
                                  "`id` as `avatar_id`.", {
                                      "201": _ok("Added.", {"application/json": {"schema": _ref("Avatar")}},
                                                 {"Location": _header("Location")}),
                                      "400": _error("Not an image or video, or a bad field (codes `invalid_image`, "
                                                    "`invalid_video`, `image_too_large`, `missing_input`, "
                                                    "`invalid_name`, `unknown_model`)."),
                                      "413": _error("Too large (codes `payload_too_large`, `upload_too_large`, "
                                                    "`video_too_long`)."),
                                      "422": _error("No face (`no_face`) or more than one (`several_faces`); "
                                                    "the message names the frame."),
                                      "503": _error("Not loaded yet (code `not_ready`)."),
                                  }, bucket="write", get=False, requestBody=upload),
            },
            "/api/avatars/{avatar_id}": {
                "parameters": [_AVATAR_ID_PARAM],
                "get": avatar_op("One avatar.", {
                    "200": _ok("The avatar.", {"application/json": {"schema": _ref("Avatar")}}),
                    "404": not_found}),
                "delete": avatar_op("Delete an avatar and its files.", {
                    "204": {"description": "Deleted.", "headers": {"X-Request-ID": _header("X-Request-ID")}},
                    "404": not_found,
                    "409": _error("The default avatar cannot be deleted (code `avatar_is_default`)."),
                }, get=False),
            },
            "/api/avatars/{avatar_id}/thumbnail": {
                "parameters": [_AVATAR_ID_PARAM],
                "get": avatar_op("A 256 px JPEG of the avatar.", {
                    "200": _ok("JPEG image.", _binary("image/jpeg")), "404": not_found}),
            },
            "/api/avatars/{avatar_id}/image": {
                "parameters": [_AVATAR_ID_PARAM],
                "get": avatar_op("The avatar at output size (JPEG), as videos show it.", {
                    "200": _ok("JPEG image.", _binary("image/jpeg")), "404": not_found}),
            },
        }

    def session_paths(self) -> dict:
        def session_op(summary: str, responses: dict, *, bucket: str = "read", get: bool = True, **extra) -> dict:
            return self.op(summary, self.guarded(responses, bucket=bucket, write=bucket == "write"),
                           tags=["live"], get=get, **extra)

        not_found = _error("No open session with this id for this API key (code `unknown_session`).")
        session_param = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
        body = {"required": False, "content": {"application/json": {"schema": {"type": "object", "properties": {
            "avatar_id": _AVATAR_ID_SCHEMA, "model": _MODEL_SCHEMA, "idle_motion": _IDLE_MOTION_SCHEMA,
            "language": {"type": "string", "enum": list(LANGUAGE_CHOICES), "nullable": True,
                         "description": "The voice; `auto` (default): each sentence's own language."}}}}}}
        return {
            "/api/sessions": {"post": session_op(
                "Open a live conversation: send text over `ws_url` (WebSocket), play `video_url`.", {
                    "201": _ok("Opened.", {"application/json": {"schema": _ref("Session")}},
                               {"Location": _header("Location")}),
                    "400": _error("Bad input (`invalid_json`, `invalid_input`, `unsupported_language`, "
                                  "`unknown_avatar`, `unknown_model`, `unsupported_avatar`: a video avatar)."),
                    "429": _error("`MAX_SESSIONS` sessions are open (code `too_many_sessions`).", retry_after=True),
                    "503": _error("No render slot free (`busy`), not loaded (`not_ready`), cluster mode "
                                  "(`sessions_unavailable`), shutting down (`shutting_down`).", retry_after=False),
                }, bucket="write", get=False, requestBody=body)},
            "/api/sessions/{session_id}": {
                "parameters": [session_param],
                "get": session_op("The session's state.", {
                    "200": _ok("Open.", {"application/json": {"schema": _ref("Session")}}), "404": not_found}),
                "delete": session_op("End the session.", {
                    "204": {"description": "Ended.", "headers": {"X-Request-ID": _header("X-Request-ID")}},
                    "404": not_found}, get=False),
            },
            "/api/sessions/{session_id}/video": {
                "parameters": [session_param],
                "get": session_op("The live video: fragmented MP4 (H.264 + AAC), one chunked response for as "
                                  "long as the session lasts, from its last keyframe on; for Media Source "
                                  "Extensions or a player of progressive MP4.", {
                                      "200": _ok("The stream.", _binary("video/mp4")), "404": not_found})},
            "/api/sessions/{session_id}/ws": {
                "parameters": [session_param],
                "get": session_op(
                    "The conversation (WebSocket, RFC 6455; README \"Live conversation\" has the protocol). "
                    "Client: `{\"type\": \"text\", \"text\", \"final\"}`, `flush`, `interrupt`, `ping`, "
                    "`close`. Server: `ready`, `speaking_started`, `speaking_ended`, `error`, `closed`.", {
                        "101": {"description": "Switching to the WebSocket protocol.",
                                "headers": {"X-Request-ID": _header("X-Request-ID")}},
                        "400": _error("Not a WebSocket handshake (code `websocket_required`)."),
                        "404": not_found})},
        }

    def ops_paths(self) -> dict:
        metrics_public = not self.keys or self.server.metrics_public
        return {
            "/api/health": {"get": self.op("Readiness: engine, device, TTS, face detector.", {
                "200": _ok("Ready.", {"application/json": {"schema": _ref("Health")}}),
                "503": _ok("Loading, failed to load, or shutting down (see `status`, `error`).",
                           {"application/json": {"schema": _ref("Health")}}),
            }, tags=["operations"], public=True)},
            "/api/models": {"get": self.op("Every loaded lip-sync model (each checkpoint in CHECKPOINTS_DIR, and "
                                           "`builtin`); `model` on requests picks one.", {
                "200": _ok("The models, the default marked.", {"application/json": {"schema": {
                    "type": "array", "items": _ref("Model")}}}),
                "503": _error("Not loaded yet (code `not_ready`)."),
            }, tags=["operations"], public=True)},
            "/api/openapi.json": {"get": self.op("This document.", {
                "200": _ok("OpenAPI 3 document.", {"application/json": {"schema": {"type": "object"}}})},
                tags=["operations"], public=True)},
            "/metrics": {"get": self.op("Prometheus metrics (text format).", {
                "200": _ok("Metrics.", {"text/plain": {"schema": {"type": "string"}}}),
                **({} if metrics_public else {"401": _UNAUTHORIZED}),
            }, tags=["operations"], public=metrics_public, get=True)},
        }


def _binary(media_type: str) -> dict:
    return {media_type: {"schema": {"type": "string", "format": "binary"}}}


def _language_schema() -> dict:
    choices = list(LANGUAGE_CHOICES)
    # The service accepts the codes in any case and with surrounding spaces ("EN", " ru ").
    any_case = "|".join("".join(f"[{c.upper()}{c}]" for c in code) for code in choices)
    return {"type": "string", "pattern": f"^\\s*({any_case})\\s*$", "default": "ru", "example": "ru",
            "description": "Speech language, case-insensitive: " + ", ".join(choices)
                           + " (ru: Russian, kk: Kazakh, en: English; auto: from the text's letters). "
                             "Omitted: ru, whatever the text. Given: it must fit the text's script "
                             "(400 `language_mismatch`) unless `allow_mismatch` is true."}


_AVATAR_ID_SCHEMA = {"type": "string", "maxLength": 64, "nullable": True, "example": "default",
                     "description": "An avatar of the library (`GET /api/avatars`): `default` or an id this API "
                                    "key uploaded; 400 `unknown_avatar` otherwise. Not with an `avatar` upload. "
                                    "Null or empty: the preloaded avatar."}
_AVATAR_ID_PARAM = {"name": "avatar_id", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": "^(default|av_[0-9a-f]{16})$"}, "example": "default",
                    "description": "`default` or an id `POST /api/avatars` returned."}

_MODEL_SCHEMA = {"type": "string", "maxLength": 200, "nullable": True, "example": "builtin",
                 "description": "A lip-sync model by name (`GET /api/models`: a checkpoint's file stem, or "
                                "`builtin`); 400 `unknown_model` otherwise. Omitted: the avatar's preferred "
                                "model, else the default."}
_IDLE_MOTION_SCHEMA = {"type": "boolean", "nullable": True,
                       "description": "Blinks, a slow head sway and breathing (default: the server's IDLE_MOTION, "
                                      "on unless set off); the same input gives the same motion."}

_ALLOW_MISMATCH_SCHEMA = {"type": "boolean", "default": False,
                          "description": "Let the voice read a text in another script on purpose (an accent)."}


def _schemas() -> dict:
    error = {"type": "object", "required": ["error", "code"], "properties": {
        "error": {"type": "string", "description": "What went wrong, in English; never a traceback."},
        "code": {"type": "string", "description": "Stable machine-readable code."},
        "retry_after": {"type": "integer", "minimum": 1, "description": "Seconds; also in Retry-After."}}}
    nullable_str = {"type": "string", "nullable": True}
    job_state = {"type": "object", "required": ["id", "status", "progress", "timings", "created_at"], "properties": {
        "id": {"type": "string", "pattern": JOB_ID_PATTERN},
        "status": {"type": "string", "enum": list(STATUSES)},
        "stage": {"type": "string", "nullable": True, "description": "tts, lipsync or encode; None while queued."},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "queue_position": {"type": "integer", "minimum": 1, "nullable": True},
        "error": {**error, "nullable": True},
        "timings": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "Stage durations in ms, plus queue_wait."},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {**nullable_str, "format": "date-time"},
        "finished_at": {**nullable_str, "format": "date-time"},
        "duration": {"type": "number", "nullable": True, "description": "Seconds of video."},
        "frames": {"type": "integer", "nullable": True},
        "engine": nullable_str,
        "language": {**nullable_str, "description": "The voice of a text job (auto resolved); null for a recording."},
        "callback_url": nullable_str,
    }}
    urls = ("status_url", "events_url", "video_url", "stream_url")
    job = {"allOf": [_ref("JobState"), {"type": "object", "required": list(urls),
                                        "properties": {name: {"type": "string"} for name in urls}}]}
    health = {"type": "object", "required": ["status"], "properties": {
        "status": {"type": "string", "enum": ["loading", "ready", "error", "shutting_down"]},
        "models_loaded": {"type": "boolean"}, "avatar_loaded": {"type": "boolean"},
        "engine": nullable_str, "device": nullable_str, "checkpoint": nullable_str, "version": nullable_str,
        "tts_provider": nullable_str, "face_detector": nullable_str, "error": {"type": "string"},
        "video_encoder": {**nullable_str, "description": "The H.264 encoder of generated videos (VIDEO_ENCODER "
                          "resolved: openh264 or x264); null while loading."},
        "model": {"type": "string", "description": "The default model's name."},
        "models": {"type": "array", "items": {"type": "string"}, "description": "Every loaded model's name."},
        "avatar": {"type": "object", "properties": {
            "width": {"type": "integer"}, "height": {"type": "integer"},
            "face_box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4}}}}}
    avatar = {"type": "object", "required": ["id", "name", "kind", "width", "height", "frames", "face_box",
                                             "url", "thumbnail_url", "image_url"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["image", "video"]},
        "width": {"type": "integer"}, "height": {"type": "integer"},
        "fps": {"type": "number", "nullable": True}, "frames": {"type": "integer"},
        "face_box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
                     "description": "x1, y1, x2, y2 in pixels of the avatar at output size (a video: on "
                                    "its reference frame, the thumbnail)."},
        "duration": {"type": "number", "nullable": True, "description": "A video's seconds (one pass)."},
        "model": {"type": "string", "nullable": True, "description": "The preferred model (null: the default)."},
        "face_boxes": {"type": "array", "nullable": True, "description": "A video's face box in every frame "
                       "(smoothed); null where the face is lost (those frames are left untouched).",
                       "items": {"type": "array", "nullable": True, "items": {"type": "integer"}}},
        "created_at": {"type": "number", "description": "Unix seconds."},
        "url": {"type": "string"}, "thumbnail_url": {"type": "string"}, "image_url": {"type": "string"}}}
    model = {"type": "object", "required": ["name", "engine", "default"], "properties": {
        "name": {"type": "string"}, "engine": {"type": "string", "enum": ["wav2lip", "builtin"]},
        "checkpoint": nullable_str, "layout": nullable_str,
        "params": {"type": "integer", "description": "Learnable parameters (0 for builtin)."},
        "device": nullable_str, "precision": nullable_str, "default": {"type": "boolean"},
        "description": {**nullable_str, "description": "From `checkpoints/<name>.json`, if any."},
        "memory_mb": {"type": "number", "description": "What loading it cost (process memory, plus GPU memory)."}}}
    session = {"type": "object", "required": ["id", "status", "url", "ws_url", "video_url"], "properties": {
        "id": {"type": "string"}, "status": {"type": "string", "enum": ["open", "closed"]},
        "model": nullable_str, "language": nullable_str, "fps": {"type": "integer"},
        "width": {"type": "integer"}, "height": {"type": "integer"},
        "seconds": {"type": "number", "description": "Video made so far."},
        "speaking": {"type": "boolean"}, "viewers": {"type": "integer"}, "close_reason": nullable_str,
        "codecs": {**nullable_str, "description": "The stream's RFC 6381 codecs, once it started."},
        "url": {"type": "string"}, "ws_url": {"type": "string"}, "video_url": {"type": "string"}}}
    return {"Error": error, "JobState": job_state, "Job": job, "Health": health, "Avatar": avatar, "Model": model,
            "Session": session}


_UNAUTHORIZED = _error("No or an invalid API key (code `unauthorized`).", www_authenticate=True)
_WRITE_ERRORS = {
    "400": _error("Bad input: `invalid_json`, `missing_input`, `invalid_text`, `empty_text`, "
                  "`unsupported_language`, `language_mismatch`, `invalid_input`, `invalid_audio`, `invalid_image`, "
                  "`image_too_large`, `invalid_callback_url`, `unknown_avatar`, `unknown_model`."),
    "413": _error("Over a limit: `text_too_long`, `upload_too_large`, `payload_too_large`, `audio_too_long`, "
                  "`speech_too_long`."),
    "503": _error("Not now: `not_ready` (models loading or failed), `busy` (all render slots taken), "
                  "`shutting_down`, `tts_unavailable` (the remote TTS circuit is open), `tts_timeout`.",
                  retry_after=False),
}
_JOB_ID_PARAM = {"name": "job_id", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
                 "description": "The id `POST /api/jobs` returned (32 hex characters)."}
_CALLBACK_SCHEMA = {"type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH, "nullable": True,
                    "description": "http(s) URL that receives the final job state as a signed POST "
                                   "(see the webhook headers X-Signature, X-Signature-Timestamp); "
                                   "null or absent: no webhook."}
_INT_HEADER = {"schema": {"type": "integer", "minimum": 0}}
_HEADERS = {
    "X-Request-ID": {"required": True, "description": "The request's id: the sane X-Request-ID you "
                     "sent, or a generated one. Also in the server's log line.",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 128}},
    "Retry-After": {"description": "Seconds to wait before trying again.", **_INT_HEADER},
    "WWW-Authenticate": {"required": True, "schema": {"type": "string"}},
    "Location": {"required": True, "description": "The job's status URL.", "schema": {"type": "string"}},
    "Content-Range": {"required": True, "schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string"}},
    "X-Processing-Time": {"required": True, "description": "Seconds spent.", "schema": {"type": "number"}},
    "X-Video-Duration": {"required": True, "schema": {"type": "number"}},
    "X-Video-Frames": {"required": True, "schema": {"type": "integer"}},
    "X-Engine": {"required": True, "schema": {"type": "string"}},
    "X-Speech-Language": {"description": "The voice that spoke the text (auto resolved); absent for a recording.",
                          "schema": {"type": "string", "enum": list(LANGUAGES)}},
    "Server-Timing": {"required": True, "description": "Stage timings: `tts;dur=12.3, ...` (ms).",
                      "schema": {"type": "string"}},
}
_SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "apiKeyQuery": {"type": "apiKey", "in": "query", "name": "api_key",
                    "description": "GET requests only, for clients that cannot set headers "
                                   "(EventSource, <video src>). Prefer a header: URLs end up in logs."},
}


__all__ = ["JOB_ID_PATTERN", "build_openapi"]
