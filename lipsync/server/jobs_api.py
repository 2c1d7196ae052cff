"""The jobs API: ``POST /api/jobs`` (202), ``GET /api/jobs/<id>``, ``/events`` (SSE),
``/video`` (Range), ``/stream`` (fragmented MP4 while rendering) and ``DELETE``."""

from __future__ import annotations

import json

from flask import Blueprint, Response, jsonify, request, send_file, stream_with_context, url_for

from lipsync.errors import LipsyncError
from lipsync.jobs import JobRequest, follow_live, open_live
from lipsync.server import context
from lipsync.server.observability import ENV_JOB_ID
from lipsync.server.request_inputs import callback_url, generate_inputs

jobs_api = Blueprint("jobs", __name__, url_prefix="/api/jobs")

# How long an /events or /stream connection waits for its job before the client must reconnect (s).
FOLLOW_SECONDS = 300
HEARTBEAT_SECONDS = 15


@jobs_api.post("")
def submit():
    inputs = generate_inputs()  # validated: a JSON object or a multipart form
    job = context.jobs().submit(JobRequest(**inputs, callback_url=callback_url()))
    request.environ[ENV_JOB_ID] = job.id
    state = {**job.to_dict(), **_job_urls(job.id)}
    return jsonify(state), 202, {"Location": state["status_url"]}


def _job_urls(job_id: str) -> dict:
    return {"status_url": url_for("jobs.status", job_id=job_id),
            "events_url": url_for("jobs.events", job_id=job_id),
            "video_url": url_for("jobs.video", job_id=job_id),
            "stream_url": url_for("jobs.stream", job_id=job_id)}


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
    return send_file(path, mimetype="video/mp4", conditional=True, download_name="avatar.mp4")


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
