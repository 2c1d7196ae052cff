"""The jobs API: ``POST /api/jobs`` (202), ``GET /api/jobs/<id>``, ``/events`` (SSE),
``/video`` (Range), ``/stream`` (fragmented MP4 while rendering) and ``DELETE``."""

from __future__ import annotations

import json
import os
import re

from flask import Blueprint, Response, jsonify, request, send_file, stream_with_context

from lipsync.errors import LipsyncError
from lipsync.jobs import JobRequest, follow_live, open_live
from lipsync.server import context
from lipsync.server.links import job_links
from lipsync.server.observability import ENV_JOB_ID, ENV_KEY_ID
from lipsync.server.request_inputs import callback_url, generate_inputs

jobs_api = Blueprint("jobs", __name__, url_prefix="/api/jobs")

# How long an /events or /stream connection waits for its job before the client must reconnect (s).
FOLLOW_SECONDS = 300
HEARTBEAT_SECONDS = 15


@jobs_api.post("")
def submit():
    inputs = generate_inputs()  # validated: a JSON object or a multipart form
    # The owner (API key id) scopes the avatar lookup and the Idempotency-Key: a retry with the
    # same key and body gets the job the first request made (README "Jobs").
    inputs["owner"] = request.environ.get(ENV_KEY_ID)
    job = context.jobs().submit(JobRequest(**inputs, callback_url=callback_url(),
                                           idempotency_key=request.headers.get("Idempotency-Key")))
    request.environ[ENV_JOB_ID] = job.id
    state = {**job.to_dict(), **_job_urls(job.id)}
    return jsonify(state), 202, {"Location": state["status_url"]}


def _job_urls(job_id: str) -> dict:
    return job_links(job_id)


def _not_found() -> LipsyncError:
    return LipsyncError("no such job (it may have expired)", code="job_not_found", status=404)


def _job_or_404(job_id: str) -> dict:
    state = context.jobs().get(job_id)  # None for anything not shaped like a job id: ids never become paths here
    if state is None:
        raise _not_found()
    request.environ[ENV_JOB_ID] = job_id
    return state


@jobs_api.get("/<job_id>")
def status(job_id: str):
    return jsonify({**_job_or_404(job_id), **_job_urls(job_id)})


@jobs_api.get("/<job_id>/events")
def events(job_id: str):
    _job_or_404(job_id)
    jobs = context.jobs()
    lifecycle = context.lifecycle()

    def stream():
        for state in jobs.events(job_id, timeout=FOLLOW_SECONDS, heartbeat=HEARTBEAT_SECONDS):
            if lifecycle.stopped.is_set():
                return  # the server is going away: the client reconnects to the next one
            yield ": keep-alive\n\n" if state is None else f"data: {json.dumps(state)}\n\n"

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@jobs_api.get("/<job_id>/video")
def video(job_id: str):
    state = _job_or_404(job_id)
    path = context.jobs().result_path(job_id)
    if path is None:
        raise LipsyncError(f"the video is not ready (job {state['status']})", code="job_not_done", status=409)
    _sane_range(os.path.getsize(path))
    return send_file(path, mimetype="video/mp4", conditional=True, download_name="avatar.mp4")


_BYTE_RANGES = re.compile(r"bytes=\s*(\d*-\d*)\s*(,\s*\d*-\d*\s*)*")


def _sane_range(size: int) -> None:
    """Read the Range header as RFC 9110 says before werkzeug sees it: one it cannot parse
    (another unit, bad syntax) is ignored (the whole file, 200), and a suffix range longer
    than the file selects the whole file (206), neither is a 416."""
    header = request.environ.get("HTTP_RANGE")
    if header is None:
        return
    if not _BYTE_RANGES.fullmatch(header.strip()) or header.strip() in ("bytes=-", "bytes="):
        del request.environ["HTTP_RANGE"]
        return
    spec = header.strip()[len("bytes="):].strip()
    if "," not in spec and spec.startswith("-") and int(spec[1:]) > size:
        request.environ["HTTP_RANGE"] = "bytes=0-"


@jobs_api.get("/<job_id>/stream")
def stream(job_id: str):
    """The video while it is being made: fragmented MP4 over a chunked response.

    Once the job is done this is the finished file (with Range support).
    """
    state = _job_or_404(job_id)
    jobs = context.jobs()
    # Wait for the first fragment (the job may still be queued or speaking).
    handle = open_live(jobs, job_id, state, timeout=FOLLOW_SECONDS, stopped=context.lifecycle().stopped)
    if handle is None:
        return video(job_id)
    return Response(stream_with_context(follow_live(jobs, job_id, handle)), mimetype="video/mp4",
                    headers={"Cache-Control": "no-cache"})


@jobs_api.delete("/<job_id>")
def cancel(job_id: str):
    jobs = context.jobs()
    if not jobs.cancel(job_id):
        raise _not_found()
    request.environ[ENV_JOB_ID] = job_id
    state = jobs.get(job_id)
    return (jsonify(state), 200) if state is not None else ("", 204)
