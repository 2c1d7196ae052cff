"""Asynchronous generation jobs: the ``JobQueue`` interface, what a job asks for
(``JobRequest``) and what the API serves about it (``Job``). ``LocalJobQueue``
(``lipsync.jobs.local``) is the implementation in this process.

Lifecycle of a job::

    queued --claim--> running --> done | failed | cancelled
    queued --cancel-------------> cancelled

Decisions where the issue left room:

* ``queue_position`` is 1-based (1 = runs next) and counts queued jobs only.
* ``stage`` is None while queued, then the pipeline stage ("tts", "lipsync",
  "encode"); an ended job keeps the last stage it reached (a failed job shows
  where it failed). ``progress`` maps the stages onto 0..1 (``STAGE_SPANS``:
  tts 0-0.2, lipsync 0.2-0.9, encode 0.9-1), never decreases, stays below 1
  until the job is done.
* ``timings`` are the service's (ms) plus ``queue_wait``.
* ``cancel()`` of a queued or running job sets status ``cancelled`` at once
  (and sends its webhook); a running render is aborted at its next progress
  report, and its files are removed. ``cancel()`` of an ended job (done,
  failed or cancelled) is a DELETE: its files *and its record* are removed,
  so ``get()`` returns None afterwards.
* A job that a stop, crash or restart cut short fails with code ``interrupted``
  (``INTERRUPTED_ERROR``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

from lipsync.jobs.store import FINAL_STATUSES

INTERRUPTED_ERROR = {"error": "the server restarted before this job finished", "code": "interrupted"}

# Where each service stage (``LipsyncService.generate``'s progress callback) lands on the job's 0..1 progress.
STAGE_SPANS = {"tts": (0.0, 0.2), "lipsync": (0.2, 0.9), "encode": (0.9, 1.0)}
RUNNING_PROGRESS_MAX = 0.99


@dataclass(frozen=True)
class JobRequest:
    """What to make: ``text`` (+ ``language``, maybe ``"auto"``; ``allow_mismatch`` lets a voice
    read a text in another script on purpose) or a ``recording`` (any format ffmpeg reads; it
    wins over text when both are given), optionally another ``avatar_image`` or a library
    ``avatar_id`` (looked up for ``owner``, an API key id), and an http(s) ``callback_url`` to
    POST the final state to. ``idempotency_key`` (the ``Idempotency-Key`` header): a retry of the
    same request with the same key (and ``owner``) gets the same job, not a second one."""

    text: str | None = None
    language: str | None = None
    allow_mismatch: bool = False
    recording: bytes | None = None
    avatar_image: bytes | None = None
    avatar_id: str | None = None
    owner: str | None = None
    idle_motion: bool | None = None
    model: str | None = None  # a lip-sync model by name (None: the avatar's, else the default)
    callback_url: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Job:
    """A job's state; ``to_dict()`` is the JSON the API serves."""

    id: str
    status: str
    stage: str | None
    progress: float
    queue_position: int | None
    error: dict | None
    timings: dict
    created_at: str
    started_at: str | None
    finished_at: str | None
    duration: float | None
    frames: int | None
    engine: str | None
    language: str | None     # the voice of a text job ("auto" resolved); None for a recording
    callback_url: str | None

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


class JobQueue(abc.ABC):
    """What the web layer needs from a job backend. Nothing here assumes the job runs
    in the calling process: a Redis backend with remote workers fits the same shape."""

    @abc.abstractmethod
    def start(self) -> None:
        """Recover from a previous run and start serving jobs."""

    @abc.abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; a running job is aborted and reported ``interrupted``."""

    def drain(self, timeout: float) -> bool:
        """Start no further job; wait up to ``timeout`` s for the running one to end. True when idle.
        (Graceful shutdown: ``drain()`` then ``stop()``.)"""
        return True

    @abc.abstractmethod
    def submit(self, request: JobRequest) -> Job:
        """Validate and queue ``request``. Raises the service's 4xx ``LipsyncError`` for bad
        input, ``InvalidInputError`` (invalid_callback_url), ``QueueFullError`` (429)."""

    @abc.abstractmethod
    def get(self, job_id: str) -> dict | None:
        """The job's state, or None for an unknown, expired, deleted or malformed id."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> bool:
        """Cancel a queued/running job, or delete an ended one; False for an unknown id."""

    @abc.abstractmethod
    def events(self, job_id: str, timeout: float | None = None) -> Iterator[dict]:
        """The current state, then every change of status/stage/progress/queue_position,
        ending right after a final state (or when ``timeout`` seconds have passed)."""

    @abc.abstractmethod
    def result_path(self, job_id: str) -> str | None:
        """Path of a done job's MP4, None otherwise."""

    @abc.abstractmethod
    def live_path(self, job_id: str) -> str | None:
        """Path of the fragmented MP4 growing while the job runs, None when not running."""
