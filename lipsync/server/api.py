"""The synchronous API: ``POST /api/generate`` (the MP4 in the response), ``GET /api/health``,
``GET /api/models``, ``GET /api/avatar`` and ``GET /api/openapi.json``."""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.wsgi import wrap_file

from lipsync.errors import LipsyncError
from lipsync.inputs import check_service_loaded
from lipsync.server import context
from lipsync.server.request_inputs import generate_inputs
from lipsync.tempdirs import process_temp_dir

api = Blueprint("api", __name__, url_prefix="/api")


@api.get("/health")
def health():
    info = context.service().describe()
    if context.lifecycle().stopping.is_set():
        info["status"] = "shutting_down"  # load balancers: send new work elsewhere
    return jsonify(info), 200 if info["status"] == "ready" else 503


@api.get("/models")
def models():
    """Every loaded lip-sync model (``lipsync.engines.models``), the default marked."""
    service = context.service()
    check_service_loaded(service)
    if service.models is None:
        raise LipsyncError("the models are still loading", code="not_ready", status=503)
    return jsonify(service.models.public())


@api.get("/openapi.json")
def openapi():
    return jsonify(current_app.extensions["openapi"])


@api.get("/avatar")
def avatar():
    image = context.service().avatar_jpeg
    if image is None:
        raise LipsyncError("the avatar is not loaded yet", code="not_ready", status=503)
    return Response(image, mimetype="image/jpeg", headers={"Cache-Control": "no-cache"})


@api.post("/generate")
def generate():
    service = context.service()
    inputs = generate_inputs()
    with current_app.extensions["render_slots"].slot():
        with process_temp_dir("http", service.temp_root()) as tmp:
            out_path = os.path.join(tmp, "avatar.mp4")
            result = service.generate(out_path, **inputs)
            # Streamed from the open file, not read into memory; the folder can go
            # at once (POSIX keeps the open file readable), the response closes it.
            video_file = open(out_path, "rb")
            size = os.fstat(video_file.fileno()).st_size
    context.metrics().observe_stages(result.timings, "sync")
    timings = result.timings
    headers = {
        "Content-Disposition": 'inline; filename="avatar.mp4"',
        "X-Processing-Time": f"{timings['total'] / 1000.0:.3f}",
        "X-Video-Duration": f"{result.duration:.3f}",
        "X-Video-Frames": str(result.frames),
        "X-Engine": result.engine,
        **({"X-Speech-Language": result.language} if result.language else {}),
        "Server-Timing": ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in timings.items()),
        "Content-Length": str(size),
    }
    return Response(wrap_file(request.environ, video_file), mimetype="video/mp4", headers=headers,
                    direct_passthrough=True)
