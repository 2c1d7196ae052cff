"""A server's capacity and its end: slots for synchronous renders, and the graceful shutdown.

* ``RenderSlots``: at most N synchronous renders at once; a request waits a while for a
  slot, then is refused with 503 ``busy``.
* ``Lifecycle``: on SIGTERM new work is refused (503 ``shutting_down``), the running job and
  renders get a grace period, then the job queue stops and the HTTP server is told to stop.

No Flask here: the web layer calls ``slot()`` around a render and ``check_accepting()``
before work starts; ``python app.py`` and gunicorn's hooks call ``begin()``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from lipsync.errors import RefusedError
from lipsync.memory import release_memory

if TYPE_CHECKING:
    from lipsync.jobs import JobQueue

log = logging.getLogger("lipsync.web")


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
    def slot(self) -> Iterator[None]:
        """Hold a slot for the ``with`` block; ``RefusedError`` 503 ``busy`` when none frees up in time.
        When the last render ends, freed memory goes back to the OS."""
        if not self._semaphore.acquire(timeout=self.wait):
            raise RefusedError(f"the server is busy with {self.count} videos; try again shortly or use /api/jobs",
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
        """Wait up to ``timeout`` s until no render runs; False if one still does."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.active, timeout)


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
        self._callbacks: list[Callable[[], None]] = []
        self._stopping_callbacks: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    def on_stopping(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the shutdown begins, before waiting for the running work."""
        self._stopping_callbacks.append(callback)

    def on_stopped(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the shutdown is complete."""
        self._callbacks.append(callback)

    def check_accepting(self) -> None:
        """Refuse new work once the shutdown began: ``RefusedError`` 503 ``shutting_down``, Retry-After 10 s."""
        if self.stopping.is_set():
            raise RefusedError("the server is shutting down; send the request again in a moment", code="shutting_down",
                            status=503, retry_after=10)

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
        for callback in self._stopping_callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001
                log.exception("shutdown callback failed")
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
        """Wait up to ``timeout`` s (None: for ever) for the shutdown to complete; True once it has."""
        return self.stopped.wait(timeout)
