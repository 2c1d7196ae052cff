"""A job's video while it is being made: the fragmented MP4 that grows until the job ends.

``open_live`` waits for the file's first fragment and opens it; ``follow_live`` yields its
bytes as the job writes them. The web layer sends them as a chunked response
(``GET /api/jobs/<id>/stream``) and falls back to the finished file when there is none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from lipsync.jobs.queue import JobQueue
from lipsync.jobs.store import QUEUED, RUNNING

POLL_SECONDS = 0.05        # how often the job and its file are looked at again
CHUNK_BYTES = 256 * 1024   # the most read (and yielded) at once


def open_live(jobs: JobQueue, job_id: str, state: dict, *, timeout: float,
              stopped: threading.Event) -> BinaryIO | None:
    """The growing MP4 of job ``job_id``, opened for reading once its first fragment exists.

    ``state``: the job's state (``jobs.get``) as last read. Waits while the job is queued or
    running, at most ``timeout`` s and until ``stopped`` is set. None when there is no live
    file to follow: the job ended (or was never started) first, or the wait ran out.
    """
    deadline = time.monotonic() + timeout
    live = None
    while state["status"] in (QUEUED, RUNNING) and time.monotonic() < deadline and not stopped.is_set():
        live = jobs.live_path(job_id)
        if live is not None:
            break
        time.sleep(POLL_SECONDS)
        state = jobs.get(job_id)
        if state is None:  # deleted or expired meanwhile: nothing will ever stream
            return None
    if live is None:
        return None
    try:
        return open(live, "rb")
    except FileNotFoundError:  # finished in between: the live copy is gone
        return None


def follow_live(jobs: JobQueue, job_id: str, handle: BinaryIO) -> Iterator[bytes]:
    """The bytes of ``handle`` (from ``open_live``) as job ``job_id`` writes them, in chunks of
    at most ``CHUNK_BYTES``, until the job is no longer queued or running; closes ``handle``."""
    with handle:
        while True:
            chunk = handle.read(CHUNK_BYTES)
            if chunk:
                yield chunk
                continue
            current = jobs.get(job_id)
            if current is None or current["status"] not in (QUEUED, RUNNING):
                rest = handle.read()
                if rest:
                    yield rest
                return
            time.sleep(POLL_SECONDS)
