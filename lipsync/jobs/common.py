"""What every job backend does the same way: checking a submission, the files of a job, running
the pipeline for it (progress, abort, outcome), following its state, idempotency keys.

``LocalJobQueue`` (SQLite, a worker thread) and the cluster's ``RedisJobQueue`` + ``python -m
lipsync worker`` (Redis, RQ) keep their records differently; what a job *is* lives here once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lipsync.errors import InvalidInputError, LipsyncError, QueueFullError, RefusedError
from lipsync.inputs import AVATAR, check_recording, check_service_loaded, check_upload
from lipsync.jobs.queue import RUNNING_PROGRESS_MAX, STAGE_SPANS, JobRequest
from lipsync.jobs.store import FINAL_STATUSES
from lipsync.jobs.webhooks import validate_callback_url

log = logging.getLogger("lipsync.jobs")

INTERNAL_ERROR = {"error": "internal error; the server log has the details", "code": "internal_error"}

RESULT_NAME = "video.mp4"
LIVE_NAME = "live.mp4"  # fragmented copy growing while the job renders (streaming)
RECORDING_NAME = "recording.bin"
AVATAR_NAME = "avatar.bin"

MAX_IDEMPOTENCY_KEY = 255


class Abort(Exception):  # noqa: N818 - control flow inside a worker, never an error users see
    """Raised from the progress callback to stop a render."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "cancel" | "shutdown" | "gone"


# ------------------------------------------------------------------ submit
@dataclass(frozen=True)
class CheckedRequest:
    """A submission after its checks: what the worker needs (``stored``, JSON), the input files
    to write next to it, its ``callback_url`` and, with an idempotency key, its ``fingerprint``."""

    stored: dict
    recording: bytes | None
    avatar_image: bytes | None
    callback_url: str | None
    fingerprint: str | None


def check_request(service, settings, request: JobRequest) -> CheckedRequest:
    """Check ``request`` as every backend does before queueing it; raise the 4xx ``LipsyncError``
    a client gets for bad input (or 503 ``not_ready`` when the service failed to load)."""
    check_service_loaded(service)
    callback_url = None if request.callback_url is None else validate_callback_url(request.callback_url)
    text = language = None
    if request.recording is not None:
        check_recording(request.recording, settings)
    else:
        if request.text is None:
            raise InvalidInputError("send 'text' or a recording", code="missing_input")
        text, language = service.validate_text(request.text, request.language, allow_mismatch=request.allow_mismatch)
    if request.avatar_image is not None:
        check_upload(request.avatar_image, settings.max_upload_bytes, AVATAR)
    # the language as resolved ("auto" chosen, a mismatch allowed): the worker speaks it as is
    stored = {"text": text, "language": language, "allow_mismatch": request.allow_mismatch,
              "recording": None if request.recording is None else RECORDING_NAME,
              "avatar_image": None if request.avatar_image is None else AVATAR_NAME,
              "avatar_id": request.avatar_id, "owner": request.owner, "idle_motion": request.idle_motion,
              "model": request.model}
    fingerprint = None
    if request.idempotency_key is not None:
        check_idempotency_key(request.idempotency_key)
        fingerprint = request_fingerprint(request)
    return CheckedRequest(stored, request.recording, request.avatar_image, callback_url, fingerprint)


def write_inputs(job_dir: str, checked: CheckedRequest) -> None:
    """Create the job's folder with its uploaded inputs (the worker reads them from there)."""
    os.makedirs(job_dir)
    for name, data in ((RECORDING_NAME, checked.recording), (AVATAR_NAME, checked.avatar_image)):
        if data is not None:
            with open(os.path.join(job_dir, name), "wb") as f:
                f.write(data)


def queue_full_error(size: int, average_run_seconds: float | None) -> QueueFullError:
    """429 ``queue_full``; Retry-After: about one job's run time."""
    retry_after = max(1, min(3600, math.ceil(average_run_seconds if average_run_seconds is not None else 10.0)))
    return QueueFullError(f"{size} jobs are already waiting; try again later", retry_after=retry_after)


# ------------------------------------------------------------- idempotency
def check_idempotency_key(key) -> None:
    """400 ``invalid_idempotency_key`` unless ``key`` is 1-255 printable ASCII characters."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() \
            or not key.isprintable():
        raise InvalidInputError(f"'Idempotency-Key' must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                                code="invalid_idempotency_key")


def idempotency_scope(request: JobRequest) -> str:
    """Keys are per API key (``owner``): two clients never share one. Without API keys, all share one scope."""
    return request.owner or "-"


def idempotency_key_hash(request: JobRequest) -> str:
    """The key as stored: a digest of scope and key (any printable key, fixed length, nothing to escape)."""
    return hashlib.sha256(f"{idempotency_scope(request)}\n{request.idempotency_key}".encode()).hexdigest()


def request_fingerprint(request: JobRequest) -> str:
    """A digest of what the request asks for (text, options, uploads' bytes): equal for a retry of it."""
    def digest(data: bytes | None) -> str | None:
        return None if data is None else hashlib.sha256(data).hexdigest()

    what = {"text": request.text, "language": request.language, "allow_mismatch": request.allow_mismatch,
            "recording": digest(request.recording), "avatar_image": digest(request.avatar_image),
            "avatar_id": request.avatar_id, "idle_motion": request.idle_motion, "callback_url": request.callback_url,
            "model": request.model}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def idempotency_mismatch() -> InvalidInputError:
    """422: the key was used for a different request (a client bug; retrying cannot help)."""
    return InvalidInputError("this Idempotency-Key was already used for a different request; use a new key",
                             code="idempotency_key_reused", status=422)


def idempotency_in_flight() -> RefusedError:
    """409: the first request with this key is still being submitted; the retry should wait a moment."""
    return RefusedError("a request with this Idempotency-Key is still being processed; retry shortly",
                        code="idempotency_key_in_flight", status=409, retry_after=1)


# ----------------------------------------------------------------- running
def generate_kwargs(stored: dict, job_dir: str) -> dict:
    """The keyword arguments of ``LipsyncService.generate`` for a job's stored request."""
    kwargs = {}
    if stored.get("recording"):
        kwargs["recording"] = read_input(job_dir, RECORDING_NAME)
    else:
        kwargs.update(text=stored.get("text"), language=stored.get("language"),
                      allow_mismatch=bool(stored.get("allow_mismatch")))
    if stored.get("avatar_image"):
        kwargs["avatar_image"] = read_input(job_dir, AVATAR_NAME)
    elif stored.get("avatar_id"):
        kwargs.update(avatar_id=stored["avatar_id"], owner=stored.get("owner"))
    if stored.get("idle_motion") is not None:
        kwargs["idle_motion"] = bool(stored["idle_motion"])
    if stored.get("model"):
        kwargs["model"] = stored["model"]
    return kwargs


class Progress:
    """A render's stage and 0..1 progress as the service reports it (mapped by ``STAGE_SPANS``:
    never back, below 1 until done), and whether it is time to write it down."""

    def __init__(self, interval: float):
        self.interval = interval
        self.stage: str | None = None
        self.progress = 0.0
        self.written: tuple[str | None, float] = (None, 0.0)
        self.last_write = 0.0

    def advance(self, stage: str, fraction: float) -> bool:
        """Take one report; True when it should be written now (a new stage, or ``interval`` passed)."""
        lo, hi = STAGE_SPANS.get(stage, (self.progress, self.progress))
        fraction = min(1.0, max(0.0, float(fraction)))
        self.progress = round(min(RUNNING_PROGRESS_MAX, max(self.progress, lo + (hi - lo) * fraction)), 4)
        new_stage = stage != self.stage
        self.stage = stage
        if (self.stage, self.progress) == self.written:
            return False
        return new_stage or time.monotonic() - self.last_write >= self.interval

    def mark_written(self) -> None:
        self.last_write = time.monotonic()
        self.written = (self.stage, self.progress)


def failure_details(job_id: str, error: Exception) -> dict:
    """The ``error`` field of a job that failed with ``error`` (logged; internals never reach clients)."""
    if isinstance(error, LipsyncError):
        log.info("job %s failed: %s (%s)", job_id, error.message, error.code)
        return error.to_dict()
    log.error("job %s failed", job_id, exc_info=error)
    return dict(INTERNAL_ERROR)


def done_timings(result, created_at: float, started_at: float) -> dict:
    """The service's stage timings (ms) plus ``queue_wait``."""
    timings = dict(result.timings)
    timings["queue_wait"] = round(max(0.0, (started_at - created_at) * 1000.0), 1)
    return timings


def check_result(out_path: str) -> None:
    if not os.path.isfile(out_path):
        raise LipsyncError("the pipeline finished without writing the video", code="media_error")


# --------------------------------------------------------------- following
def follow_states(fetch: Callable[[], dict | None], wait: Callable[[float], None], timeout: float | None,
                  heartbeat: float | None) -> Iterator[dict | None]:
    """``JobQueue.events`` over any record store: ``fetch()`` reads the job's state (None: gone),
    ``wait(seconds)`` returns after at most that long (earlier when something may have changed).

    Yields the current state, then every change of status/stage/progress/queue_position, and
    ends after a final state, when the record disappears, or after ``timeout`` s. With
    ``heartbeat``, ``None`` is yielded after that many seconds without a change."""
    deadline = None if timeout is None else time.monotonic() + timeout
    state = fetch()
    if state is None:
        return
    yield state
    last_key = _event_key(state)
    last_yield = time.monotonic()
    while state["status"] not in FINAL_STATUSES:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return
        pause = math.inf
        if deadline is not None:
            pause = deadline - now
        if heartbeat is not None:
            pause = min(pause, max(0.0, last_yield + heartbeat - now))
        wait(pause)
        state = fetch()
        if state is None:
            return
        key = _event_key(state)
        if key != last_key:
            last_key = key
            last_yield = time.monotonic()
            yield state
        elif heartbeat is not None and time.monotonic() - last_yield >= heartbeat:
            last_yield = time.monotonic()
            yield None


def _event_key(state: dict) -> tuple:
    return state["status"], state["stage"], state["progress"], state["queue_position"]


def webhook_payload(state: dict, job_links: Callable[[str], dict] | None) -> dict:
    """A job's final state plus the web layer's links to it: the body its webhook POSTs."""
    if job_links is None:
        return state
    try:
        return {**state, **job_links(state["id"])}
    except Exception:  # noqa: BLE001 - a webhook without its links beats none
        log.exception("job %s: job_links failed; its webhook goes without them", state.get("id"))
        return state


# ------------------------------------------------------------------- files
def read_input(job_dir: str, name: str) -> bytes:
    try:
        with open(os.path.join(job_dir, name), "rb") as f:
            return f.read()
    except OSError:
        raise LipsyncError("the job's uploaded input is missing on disk", code="input_missing") from None


def unlink(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total
