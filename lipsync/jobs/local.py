"""``LocalJobQueue``: jobs in SQLite next to the outputs, rendered by one engine worker thread
per process (the interface and the job semantics: ``lipsync.jobs.queue``).

Everything is on disk next to the outputs::

    <output_dir>/jobs.sqlite3             job records (WAL), the queue itself
    <output_dir>/jobs/<id>/recording.bin  inputs, until the job ends
    <output_dir>/jobs/<id>/avatar.bin
    <output_dir>/jobs/<id>/video.mp4      the result of a done job
    <output_dir>/jobs/.owners/<owner>.lock  one per started queue (liveness, see below)

The queue *is* the ``jobs`` table: ``submit`` inserts a ``queued`` row, the
engine worker claims the oldest one with a conditional ``UPDATE``, and every
later transition is conditional too. So several processes may share one
output folder (e.g. gunicorn with one worker per GPU): each started queue
runs one engine worker thread and they all draw from the same queue, while
``get``/``cancel``/``events`` work from any of them.

Where this implementation decides:

* Expiry removes files and record alike: ended jobs older than
  ``job_ttl_seconds`` (from ``finished_at``), then the oldest done results
  while their total size is above ``job_disk_cap_bytes`` (this can include
  the newest result when it alone is larger than the cap). A value <= 0
  disables the respective rule.
* Restart: a started queue holds an exclusive ``flock`` on its own owner
  file, so a crashed process is recognisable (its lock is gone). ``start()``
  marks failed with code ``interrupted`` the running jobs of dead owners, and
  every queued job when no other live queue shares the folder. The cleanup
  thread repeats the running-job check, so a sibling process that dies is
  noticed too. Webhooks whose delivery was not confirmed are sent again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from lipsync.jobs.common import (
    AVATAR_NAME,
    LIVE_NAME,
    RECORDING_NAME,
    RESULT_NAME,
    Abort,
    Progress,
    check_request,
    check_result,
    dir_size,
    done_timings,
    failure_details,
    follow_states,
    generate_kwargs,
    idempotency_key_hash,
    idempotency_mismatch,
    idempotency_scope,
    queue_full_error,
    unlink,
    webhook_payload,
    write_inputs,
)
from lipsync.jobs.queue import INTERRUPTED_ERROR, Job, JobQueue, JobRequest
from lipsync.jobs.store import (
    CANCELLED,
    DONE,
    FAILED,
    FINAL_STATUSES,
    QUEUED,
    RUNNING,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    JobStore,
    new_job_id,
    valid_job_id,
)
from lipsync.jobs.webhooks import WebhookSender

try:  # POSIX; elsewhere other owners are simply assumed dead (one process per output folder)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("lipsync.jobs")

CANCEL_CHECK_INTERVAL = 0.5  # s: how often an unchanged render re-reads its status from the store


class LocalJobQueue(JobQueue):
    """Jobs in SQLite next to the outputs, rendered by one engine worker thread.

    ``service`` is anything with ``generate(out_path, *, text, language, recording,
    avatar_image, progress)`` and ``validate_text(text, language, allow_mismatch=)`` (normally
    ``LipsyncService``); ``status``/``wait_until_loaded`` are used when present.
    The keyword arguments exist for tests and tuning, except ``job_links``: a function of a
    job id whose dict (the web layer's URLs of that job: ``status_url`` ...) is merged into
    every webhook payload, so it matches what the API answers.
    """

    def __init__(self, service, settings, *, cleanup_interval: float = 300.0, progress_interval: float = 0.1,
                 webhook_backoff: float = 1.0, poll_interval: float = 0.5, orphan_grace: float = 60.0,
                 on_job_end: Callable[[dict], None] | None = None,
                 job_links: Callable[[str], dict] | None = None):
        self.service = service
        self.settings = settings
        self.cleanup_interval = float(cleanup_interval)
        self.progress_interval = float(progress_interval)
        self.poll_interval = float(poll_interval)
        self.orphan_grace = float(orphan_grace)
        self.jobs_dir = os.path.abspath(os.path.join(settings.output_dir, "jobs"))
        self._owners_dir = os.path.join(self.jobs_dir, ".owners")
        os.makedirs(self._owners_dir, exist_ok=True)
        self.store = JobStore(os.path.join(settings.output_dir, "jobs.sqlite3"))
        self.webhooks = WebhookSender(settings.webhook_secret, retries=settings.webhook_retries,
                                      timeout=settings.webhook_timeout, backoff=webhook_backoff,
                                      on_result=self._webhook_result)
        self.owner = uuid.uuid4().hex
        self._owner_fd: int | None = None
        self._cond = threading.Condition()
        self._version = 0                    # bumped on every change this process makes
        self._current: str | None = None     # the job the worker is rendering
        self._abort: dict[str, str] = {}     # job id -> reason, for the running job
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self.on_job_end = on_job_end         # called with the final state of every job the worker ran
        self.job_links = job_links           # job id -> extra webhook fields (the web layer's URLs)
        self._cleanup_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._started:
            return
        self._stopping.clear()
        self._take_owner_lock()
        self.webhooks.start()
        sent = set(self.recover(startup=True))  # sends the webhooks of the jobs it fails
        for job_id, _ in self.store.pending_webhooks():
            if job_id not in sent:
                self._send_webhook(job_id)     # not confirmed before the last stop or crash
        self.cleanup()
        self._threads = [threading.Thread(target=self._worker_loop, name="lipsync-jobs-worker", daemon=True),
                         threading.Thread(target=self._cleanup_loop, name="lipsync-jobs-cleanup", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._started = True
        self._notify()

    def stop(self, timeout: float = 10.0) -> None:
        if not self._started:
            return
        self._stopping.set()
        with self._cond:
            if self._current is not None:
                self._abort[self._current] = "shutdown"
            self._version += 1
            self._cond.notify_all()
        self._cleanup_wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        self.webhooks.stop(timeout=max(0.1, deadline - time.monotonic()))
        self._release_owner_lock()
        self._started = False
        self.store.close()

    def drain(self, timeout: float) -> bool:
        self._draining.set()
        self._notify()
        with self._cond:
            return self._cond.wait_for(lambda: self._current is None, timeout)

    # --------------------------------------------------------------- submit
    def submit(self, request: JobRequest) -> Job:
        """See ``JobQueue.submit``. With ``request.idempotency_key``: the job that key made
        before (same owner, same request), 422 ``idempotency_key_reused`` for another request."""
        checked = check_request(self.service, self.settings, request)
        idempotency = None
        if checked.fingerprint is not None:
            idempotency = (idempotency_scope(request), idempotency_key_hash(request), checked.fingerprint)
            earlier = self._idempotent_job(idempotency)
            if earlier is not None:
                return earlier
        if self.store.queued_count() >= self.settings.job_queue_size:
            raise self._queue_full()

        job_id = new_job_id()
        job_dir = self._job_dir(job_id)
        try:
            write_inputs(job_dir, checked)
            inserted = self.store.insert(job_id, created_at=time.time(), request=checked.stored,
                                         callback_url=checked.callback_url, max_queued=self.settings.job_queue_size,
                                         idempotency=idempotency)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        if inserted is not True:
            shutil.rmtree(job_dir, ignore_errors=True)
            earlier = self._idempotent_job(idempotency) if isinstance(inserted, str) else None
            if earlier is None:  # full (or the earlier job went in between: rare, and full is honest)
                raise self._queue_full()
            return earlier
        self._notify()
        return Job.from_dict(self.store.get(job_id))

    def _idempotent_job(self, idempotency: tuple[str, str, str]) -> Job | None:
        """The job an idempotency key made before, None when it made none (or that job is gone)."""
        scope, key, fingerprint = idempotency
        found = self.store.idempotent_job(scope, key)
        if found is None:
            return None
        job_id, earlier_fingerprint = found
        if earlier_fingerprint != fingerprint:
            raise idempotency_mismatch()
        state = self.store.get(job_id)
        return None if state is None else Job.from_dict(state)

    def _queue_full(self):
        return queue_full_error(self.settings.job_queue_size, self.store.average_run_seconds())

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> dict | None:
        if not valid_job_id(job_id):
            return None
        return self.store.get(job_id)

    def result_path(self, job_id: str) -> str | None:
        return self._file_while(job_id, DONE, RESULT_NAME)

    def live_path(self, job_id: str) -> str | None:
        return self._file_while(job_id, RUNNING, LIVE_NAME)

    def _file_while(self, job_id: str, status: str, name: str) -> str | None:
        """Path of the job's file ``name`` when the job has ``status`` and the file exists, else None."""
        if not valid_job_id(job_id):
            return None
        row = self.store.row(job_id)
        if row is None or row["status"] != status:
            return None
        path = os.path.join(self._job_dir(job_id), name)
        return path if os.path.isfile(path) else None

    def events(self, job_id: str, timeout: float | None = None, *,
               heartbeat: float | None = None) -> Iterator[dict | None]:
        """See ``JobQueue.events``. Works from any thread (and for jobs run by another process:
        the store is polled every ``poll_interval`` seconds besides the in-process wake-ups).

        With ``heartbeat`` set, ``None`` is yielded after that many seconds without a change,
        so an SSE route can write a comment and notice a client that went away.
        The iterator ends without yielding when the job is unknown, and ends early
        when the job's record disappears (deleted, expired).
        """
        if not valid_job_id(job_id):
            return
        with self._cond:
            seen = [self._version]

        def wait(pause: float) -> None:
            with self._cond:
                self._cond.wait_for(lambda: self._version != seen[0], min(pause, self.poll_interval))
                seen[0] = self._version

        yield from follow_states(lambda: self.store.get(job_id), wait, timeout, heartbeat)

    def wait(self, job_id: str, timeout: float | None = None) -> dict | None:
        """Block until the job has ended; its final state (None if unknown or on timeout)."""
        last = None
        for state in self.events(job_id, timeout):
            last = state
        return last if last is not None and last["status"] in FINAL_STATUSES else None

    # --------------------------------------------------------------- cancel
    def cancel(self, job_id: str, *, wait: float = 10.0) -> bool:
        """Cancel a queued or running job (status ``cancelled``, webhook sent, files removed), or
        delete an ended one (files and record). Waits up to ``wait`` seconds for a running render
        to stop. False when the id is unknown or malformed."""
        if not valid_job_id(job_id):
            return False
        for _ in range(5):  # each pass either acts or saw the job move on
            row = self.store.row(job_id)
            if row is None:
                return False
            status, now = row["status"], time.time()
            if status == QUEUED:
                if self.store.finish(job_id, CANCELLED, now=now, from_statuses=(QUEUED,)):
                    self._remove_files(job_id)
                    self._notify()
                    self._send_webhook(job_id)
                    return True
            elif status == RUNNING:
                if self.store.finish(job_id, CANCELLED, now=now, from_statuses=(RUNNING,)):
                    with self._cond:
                        if self._current == job_id:
                            self._abort[job_id] = "cancel"
                        self._version += 1
                        self._cond.notify_all()
                    self._send_webhook(job_id)
                    self._wait_released(job_id, wait)
                    return True
            else:
                self.store.delete(job_id)
                self._remove_files(job_id)
                self._notify()
                return True
        return False

    def _wait_released(self, job_id: str, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._current != job_id, timeout)

    # --------------------------------------------------------------- worker
    def _worker_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._service_loaded():
                continue
            # Claim under the condition's lock, so that cancel() (which takes it after moving
            # the job to cancelled) always sees the claimed job as ours.
            with self._cond:
                if self._draining.is_set():  # graceful shutdown: start nothing new
                    self._cond.wait(self.poll_interval)
                    continue
                try:
                    row = self.store.claim_next(time.time(), self.owner)
                except Exception:  # noqa: BLE001 - a locked/broken DB must not kill the worker
                    log.exception("cannot read the job queue")
                    self._cond.wait(1.0)
                    continue
                if row is None:
                    if not self._stopping.is_set():
                        self._cond.wait(self.poll_interval)
                    continue
                self._current = row["id"]
                if self._stopping.is_set():
                    self._abort[row["id"]] = "shutdown"
                self._version += 1
                self._cond.notify_all()
            try:
                _Render(self, row).run()
            except Exception:  # noqa: BLE001
                log.exception("job %s: unexpected error in the worker", row["id"])
            finally:
                with self._cond:
                    self._current = None
                    self._abort.pop(row["id"], None)
                    self._version += 1
                    self._cond.notify_all()
                self._report_end(row["id"])

    def _report_end(self, job_id: str) -> None:
        if self.on_job_end is None:
            return
        try:
            state = self.store.get(job_id)
            if state is not None:
                self.on_job_end(state)
        except Exception:  # noqa: BLE001 - logging/metrics must never break the worker
            log.exception("job %s: on_job_end failed", job_id)

    def _service_loaded(self) -> bool:
        wait = getattr(self.service, "wait_until_loaded", None)
        return wait is None or bool(wait(0.2))

    # ------------------------------------------------------ cleanup/recover
    def cleanup(self) -> dict:
        """Expire old results, enforce the disk cap, drop orphaned folders, recover jobs of
        dead sibling processes. Runs at start, every ``cleanup_interval`` s and after each job."""
        removed = {"expired": 0, "over_cap": 0, "orphans": 0, "interrupted": 0}
        now = time.time()
        removed["interrupted"] = len(self.recover(startup=False))
        ttl = self.settings.job_ttl_seconds
        if ttl and ttl > 0:
            for job_id in self.store.finished_before(now - ttl):
                if self.store.delete(job_id):
                    self._remove_files(job_id)
                    removed["expired"] += 1
        cap = self.settings.job_disk_cap_bytes
        if cap and cap > 0:
            sizes = self.store.done_sizes()
            total = sum(size for _, size in sizes)
            for job_id, size in sizes:
                if total <= cap:
                    break
                if self.store.delete(job_id):
                    self._remove_files(job_id)
                    removed["over_cap"] += 1
                total -= size
        known = self.store.all_ids()
        try:
            names = os.listdir(self.jobs_dir)
        except OSError:
            names = []
        for name in names:
            if valid_job_id(name) and name not in known:
                path = os.path.join(self.jobs_dir, name)
                try:
                    if now - os.path.getmtime(path) < self.orphan_grace:
                        continue  # maybe a submit between mkdir and insert
                except OSError:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed["orphans"] += 1
        if any(removed.values()):
            log.info("job cleanup: %s", removed)
            self._notify()
        return removed

    def recover(self, *, startup: bool) -> list[str]:
        """Fail (code ``interrupted``) the jobs no live queue will finish; returns their ids."""
        owners = self.store.running_owners() - {self.owner}
        dead = {owner for owner in owners if not self._owner_alive(owner)}
        others_alive = self._other_owner_alive() if startup else True
        if not dead and (not startup or others_alive):
            return []
        ids = self.store.interrupt(time.time(), INTERRUPTED_ERROR, queued=startup and not others_alive,
                                   running_owners=dead)
        for job_id in ids:
            self._remove_files(job_id)
            self._send_webhook(job_id)
        for owner in dead:
            unlink(os.path.join(self._owners_dir, owner + ".lock"))
        if ids:
            log.warning("marked %d unfinished job(s) as interrupted: %s", len(ids), ", ".join(ids))
            self._notify()
        return ids

    def _cleanup_loop(self) -> None:
        while not self._stopping.is_set():
            self._cleanup_wake.wait(self.cleanup_interval)
            self._cleanup_wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.cleanup()
            except Exception:  # noqa: BLE001
                log.exception("job cleanup failed")

    # ------------------------------------------------------- owner liveness
    def _take_owner_lock(self) -> None:
        if fcntl is None:
            return
        # Lock under a temporary name, then rename: a lock file visible under its final name is
        # always locked while its owner lives (a prober could otherwise take it for a dead one).
        final = os.path.join(self._owners_dir, self.owner + ".lock")
        temp = os.path.join(self._owners_dir, f".{self.owner}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(temp, final)
        self._owner_fd = fd

    def _release_owner_lock(self) -> None:
        if self._owner_fd is not None:
            unlink(os.path.join(self._owners_dir, self.owner + ".lock"))
            os.close(self._owner_fd)
            self._owner_fd = None

    def _owner_alive(self, owner: str | None) -> bool:
        """True when the queue ``owner`` still holds its lock (some live process runs it)."""
        if owner == self.owner and self._started:
            return True
        if fcntl is None or not valid_job_id(owner):
            return False
        try:
            fd = os.open(os.path.join(self._owners_dir, owner + ".lock"), os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also releases the probe lock
        return False

    def _other_owner_alive(self) -> bool:
        try:
            names = os.listdir(self._owners_dir)
        except OSError:
            return False
        for name in names:
            owner = name[:-5] if name.endswith(".lock") else None
            if owner and owner != self.owner and valid_job_id(owner):
                if self._owner_alive(owner):
                    return True
                unlink(os.path.join(self._owners_dir, name))
        return False

    # -------------------------------------------------------------- helpers
    def _job_dir(self, job_id: str) -> str:
        if not valid_job_id(job_id):  # the only way an id becomes a path
            raise ValueError(f"invalid job id {job_id!r}")
        return os.path.join(self.jobs_dir, job_id)

    def _remove_files(self, job_id: str) -> None:
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)

    def _notify(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def _send_webhook(self, job_id: str) -> None:
        state = self.store.get(job_id)
        if state is None or not state.get("callback_url"):
            return
        self.webhooks.send(state["callback_url"], webhook_payload(state, self.job_links), key=job_id)

    def _webhook_result(self, job_id: str | None, delivered: bool, attempts: int, error: str | None) -> None:
        if job_id:
            self.store.set_webhook_state(job_id, WEBHOOK_DELIVERED if delivered else WEBHOOK_FAILED)


class _Render:
    """One job the worker renders: its progress as the service reports it (written to the store
    at most every ``progress_interval`` s), the checks whether it must stop, and its end (done,
    failed or aborted)."""

    def __init__(self, jobs: LocalJobQueue, row):
        self.jobs = jobs
        self.row = row
        self.job_id = row["id"]
        self.job_dir = jobs._job_dir(self.job_id)
        self.out_path = os.path.join(self.job_dir, RESULT_NAME)
        self.progress = Progress(jobs.progress_interval)
        self._last_check = 0.0

    def run(self) -> None:
        result = error = None
        try:
            result = self._generate()
        except Exception as exc:  # noqa: BLE001 - every failure ends up in the job record
            error = exc
        reason = self.jobs._abort.get(self.job_id) or (error.reason if isinstance(error, Abort) else None)
        if reason is not None:
            ended = self._end_aborted(reason)
        elif error is not None:
            ended = self._end_failed(error)
        elif self._end_done(result):
            return
        else:
            ended = False  # the job was taken from us meanwhile
        self._discard(ended)

    def _generate(self):
        kwargs = generate_kwargs(json.loads(self.row["request"] or "{}"), self.job_dir)
        self.check_abort()
        current = self.jobs.store.row(self.job_id)
        if current is None or current["status"] != RUNNING:
            raise Abort("gone")
        result = self.jobs.service.generate(self.out_path, progress=self.report,
                                            live_path=os.path.join(self.job_dir, LIVE_NAME), **kwargs)
        self.check_abort()
        check_result(self.out_path)
        return result

    # ------------------------------------------------------------ progress
    def check_abort(self) -> None:
        """``Abort`` when ``cancel()`` or ``stop()`` in this process asked the render to stop."""
        reason = self.jobs._abort.get(self.job_id)
        if reason is not None:
            raise Abort(reason)

    def report(self, stage: str, fraction: float) -> None:
        """The service's progress callback; raises ``Abort`` to stop the render."""
        self.check_abort()
        if self.progress.advance(stage, fraction):
            self.progress.mark_written()
            if not self.jobs.store.update_progress(self.job_id, self.progress.stage, self.progress.progress):
                raise Abort("gone")  # cancelled or interrupted elsewhere
            self.jobs._notify()
        else:
            self._check_still_running()

    def _check_still_running(self) -> None:
        """Nothing new to write: still notice (every ``CANCEL_CHECK_INTERVAL`` s) a cancel made
        elsewhere (another process)."""
        now = time.monotonic()
        if now - max(self.progress.last_write, self._last_check) >= CANCEL_CHECK_INTERVAL:
            self._last_check = now
            if self.jobs.store.status(self.job_id) != RUNNING:
                raise Abort("gone")

    # ----------------------------------------------------------------- end
    def _end_aborted(self, reason: str) -> bool:
        """Stopped: a shutdown fails the job ``interrupted``; a cancel (here or in another
        process) has written the final state already. True when this wrote it."""
        ended = False
        if reason == "shutdown":
            ended = self.jobs.store.finish(self.job_id, FAILED, now=time.time(), from_statuses=(RUNNING,),
                                           stage=self.progress.stage, progress=self.progress.progress,
                                           error=INTERRUPTED_ERROR)
        log.info("job %s aborted (%s)", self.job_id, reason)
        return ended

    def _end_failed(self, error: Exception) -> bool:
        return self.jobs.store.finish(self.job_id, FAILED, now=time.time(), from_statuses=(RUNNING,),
                                      stage=self.progress.stage, progress=self.progress.progress,
                                      error=failure_details(self.job_id, error))

    def _end_done(self, result) -> bool:
        """Keep the video (the inputs go), mark the job done and send its webhook; False when
        the job was no longer ours to finish."""
        for name in (RECORDING_NAME, AVATAR_NAME, LIVE_NAME):
            unlink(os.path.join(self.job_dir, name))
        ended = self.jobs.store.finish(self.job_id, DONE, now=time.time(), from_statuses=(RUNNING,), stage="encode",
                                       progress=1.0,
                                       timings=done_timings(result, self.row["created_at"], self.row["started_at"]),
                                       duration=result.duration, frames=result.frames, engine=result.engine,
                                       size_bytes=dir_size(self.job_dir))
        if ended:
            self.jobs._notify()
            self.jobs._send_webhook(self.job_id)
            self.jobs._cleanup_wake.set()  # the disk cap may be exceeded now
        return ended

    def _discard(self, ended: bool) -> None:
        """No result to keep (failed, cancelled, or taken from us): remove the files; the
        webhook goes out when this render wrote the final state."""
        self.jobs._remove_files(self.job_id)
        self.jobs._notify()
        if ended:
            self.jobs._send_webhook(self.job_id)
