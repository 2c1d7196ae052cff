"""The avatar library over HTTP: ``POST /api/avatars`` (201), ``GET /api/avatars``,
``GET /api/avatars/<id>``, ``GET /api/avatars/<id>/thumbnail``, ``GET /api/avatars/<id>/image`` and
``DELETE /api/avatars/<id>``.

Entries belong to the API key that uploaded them (``lipsync.avatars.library``); the
preloaded avatar is the entry ``default``. ``avatar_id`` on ``/api/generate`` and
``/api/jobs`` picks an entry (``request_inputs``).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from lipsync.avatars.library import AvatarRecord
from lipsync.avatars.video import looks_like_video
from lipsync.errors import InvalidInputError
from lipsync.inputs import AVATAR, check_image, check_service_loaded
from lipsync.server import context
from lipsync.server.observability import ENV_KEY_ID
from lipsync.server.request_inputs import model_input, read_request_file

avatars_api = Blueprint("avatars", __name__, url_prefix="/api/avatars")


def request_owner() -> str | None:
    """Whose avatars this request may see and use: its API key's id (None without keys)."""
    return request.environ.get(ENV_KEY_ID)


@avatars_api.before_request
def _loaded() -> None:
    check_service_loaded(context.service())  # the library exists once the service has loaded


def _entry(record: AvatarRecord) -> dict:
    return {**record.public(), "url": f"/api/avatars/{record.id}",
            "thumbnail_url": f"/api/avatars/{record.id}/thumbnail", "image_url": f"/api/avatars/{record.id}/image"}


@avatars_api.post("")
def add():
    service = context.service()
    if request.mimetype != "multipart/form-data":
        raise InvalidInputError("send the avatar as multipart/form-data: an 'avatar' image file and an "
                                "optional 'name'", code="missing_input")
    upload = request.files.get("avatar")
    if upload is None:
        raise InvalidInputError("the 'avatar' file (an image or a video) is missing", code="missing_input")
    data = read_request_file(upload, AVATAR)
    if not looks_like_video(data):
        try:
            check_image(data, context.settings().max_image_pixels)
        except InvalidInputError as exc:
            if exc.code != "invalid_image":
                raise
            raise InvalidInputError("the avatar must be a PNG or JPEG image, or a video (MP4, MOV, WebM, MKV "
                                    "or AVI)", code="invalid_image") from None
    # Detection, landmarks and the engine's preparation: a render's worth of CPU, so it
    # takes a render slot (and waits for one like a render does).
    with current_app.extensions["render_slots"].slot():
        record = service.add_avatar(data, request.form.get("name"), request_owner(),
                                    model_input(request.form.get("model")).get("model"))
    entry = _entry(record)
    return jsonify(entry), 201, {"Location": entry["url"]}


@avatars_api.get("")
def index():
    return jsonify({"avatars": [_entry(r) for r in context.service().avatars.list(request_owner())]})


@avatars_api.get("/<avatar_id>")
def show(avatar_id: str):
    return jsonify(_entry(context.service().avatars.get(avatar_id, request_owner())))


@avatars_api.get("/<avatar_id>/thumbnail")
def thumbnail(avatar_id: str):
    image = context.service().avatars.thumbnail(avatar_id, request_owner())
    return Response(image, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@avatars_api.get("/<avatar_id>/image")
def image(avatar_id: str):
    data = context.service().avatars.image(avatar_id, request_owner())
    return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@avatars_api.delete("/<avatar_id>")
def delete(avatar_id: str):
    context.service().avatars.delete(avatar_id, request_owner())
    return "", 204
