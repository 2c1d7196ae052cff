"""``python -m lipsync worker``: a cluster worker that renders the jobs of ``RedisJobQueue``.

One process per GPU. It loads the pipeline once (``LipsyncService.load``), then runs an RQ
``SimpleWorker`` (no fork: CUDA is initialised once, in this process, and never forked) on the
``lipsync`` queue. RQ calls ``run_job(job_id)`` for each job; the job's state goes to Redis,
its files to the shared ``OUTPUT_DIR``.

* Heartbeats: while a job runs, a thread renews RQ's worker, job and execution heartbeats every
  ``WORKER_HEARTBEAT_SECONDS``, with an expiry of three of them. (RQ's SimpleWorker renews them
  only between jobs, with a 60 s margin; a worker killed mid-job would hold its job for
  minutes.) When they stop, the cluster upkeep hands the job to another worker.
* Cancel: a web node publishes the job id on ``lipsync:cancel``; this process listens and stops
  the render at its next progress report (a fraction of a second), and also notices a status
  change at its next progress write (in case a message was missed during a Redis restart).
* SIGTERM: RQ's warm shutdown: the running job finishes, then the worker exits. A second SIGTERM
  stops at once (the job is then picked up again elsewhere, as after SIGKILL).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis
from rq import SimpleWorker
from rq.job import Job as RQJob
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from lipsync.jobs.common import (
    Abort,
    Progress,
    check_result,
    dir_size,
    done_timings,
    failure_details,
    generate_kwargs,
    unlink,
)
from lipsync.jobs.redis_queue import (
    CANCEL_CHANNEL,
    JOB_TIMEOUT,
    QUEUE_NAME,
    RedisJobStore,
    connect,
    live_name,
    result_name,
    retry_redis,
)
from lipsync.jobs.store import DONE, FAILED, RUNNING
from lipsync.jobs.webhooks import WebhookSender

log = logging.getLogger("lipsync.worker")

CANCEL_CHECK_INTERVAL = 0.5  # s: how often an unchanged render re-reads its status (pub/sub's fallback)
PROGRESS_INTERVAL = 0.1      # s: progress writes to Redis at most this often

_runtime: WorkerRuntime | None = None  # this process's loaded pipeline, set by serve()


def run_job(job_id: str) -> str:
    """The RQ job function: render job ``job_id`` with this worker's preloaded pipeline.
    Returns the outcome (``done``, ``failed``, ``cancelled``, ``skipped``) for RQ's record."""
    if _runtime is None:
        raise RuntimeError("lipsync jobs run in `python -m lipsync worker`, which loads the pipeline first")
    return _runtime.run(job_id)


class WorkerRuntime:
    """What ``run_job`` needs, loaded once per process: the service, the store, the webhook sender
    and the cancel listener."""

    def __init__(self, service, settings, connection: redis.Redis, *, name: str,
                 on_job_end: Callable[[dict], None] | None = None, job_links: Callable[[str], dict] | None = None):
        self.service = service
        self.settings = settings
        self.redis = connection
        self.name = name
        self.on_job_end = on_job_end
        self.webhooks = WebhookSender(settings.webhook_secret, retries=settings.webhook_retries,
                                      timeout=settings.webhook_timeout, on_result=self._webhook_result)
        self.store = RedisJobStore(connection, settings, webhooks=self.webhooks, job_links=job_links)
        self._current: str | None = None
        self._cancelled = threading.Event()
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None

    def start(self) -> None:
        self.webhooks.start()
        self._listener = threading.Thread(target=self._listen, name="lipsync-cancel-listener", daemon=True)
        self._listener.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening; give queued webhooks ``timeout`` s to go out."""
        self._stopping.set()
        self.webhooks.wait_idle(timeout)
        self.webhooks.stop(timeout=1.0)

    def _listen(self) -> None:
        """Hear cancels of the running job; resubscribe after Redis went away."""
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("data") and message["data"].decode() == self._current:
                        log.info("job %s: cancel received", self._current)
                        self._cancelled.set()
            except redis.RedisError as exc:
                log.warning("cancel listener: %s; resubscribing", exc)
                self._stopping.wait(1.0)
            finally:
                pubsub.close()

    def _webhook_result(self, *args) -> None:
        try:
            self.store.webhook_result(*args)
        except redis.RedisError as exc:
            log.warning("webhook result not recorded: %s", exc)

    # ------------------------------------------------------------ one job
    def run(self, job_id: str) -> str:
        attempt = retry_redis(lambda: self.store.start(job_id, self.name))
        if attempt is None:
            log.info("job %s is no longer queued (cancelled or deleted); skipped", job_id)
            return "skipped"
        self._current = job_id
        self._cancelled.clear()
        render = _Render(self, job_id, attempt)
        try:
            outcome = render.run()
        finally:
            self._current = None
        if self.on_job_end is not None:
            try:
                state = self.store.get(job_id)
                if state is not None:
                    self.on_job_end(state)
            except Exception:  # noqa: BLE001 - logging/metrics never break the worker
                log.exception("job %s: on_job_end failed", job_id)
        return outcome


class _Render:
    """One attempt at one job: progress to Redis, the checks whether to stop, the outcome."""

    def __init__(self, runtime: WorkerRuntime, job_id: str, attempt: int):
        self.runtime = runtime
        self.store = runtime.store
        self.job_id = job_id
        self.attempt = attempt
        self.job_dir = self.store.job_dir(job_id)
        self.out_path = os.path.join(self.job_dir, result_name(attempt))
        self.progress = Progress(PROGRESS_INTERVAL)
        self._last_check = 0.0

    def run(self) -> str:
        try:
            fields = retry_redis(lambda: self.store.raw(self.job_id)) or {}
            kwargs = generate_kwargs(json.loads(fields.get("request") or "{}"), self.job_dir)
            result = self.runtime.service.generate(self.out_path, progress=self.report,
                                                   live_path=os.path.join(self.job_dir, live_name(self.attempt)),
                                                   **kwargs)
            self.check_abort()
            check_result(self.out_path)
        except Abort as exc:
            log.info("job %s aborted (%s)", self.job_id, exc.reason)
            self.store.remove_outputs(self.job_id)
            return "cancelled"
        except JobTimeoutException:
            return self._fail(JOB_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - every failure ends up in the job record
            return self._fail(failure_details(self.job_id, exc))
        return self._done(result, fields)

    def check_abort(self) -> None:
        if self.runtime._cancelled.is_set():
            raise Abort("cancel")

    def report(self, stage: str, fraction: float) -> None:
        """The service's progress callback; raises ``Abort`` to stop the render."""
        self.check_abort()
        try:
            if self.progress.advance(stage, fraction):
                self.progress.mark_written()
                if not self.store.update_progress(self.job_id, self.attempt, self.progress.stage,
                                                  self.progress.progress):
                    raise Abort("gone")  # cancelled, or handed to another worker
            elif time.monotonic() - max(self.progress.last_write, self._last_check) >= CANCEL_CHECK_INTERVAL:
                self._last_check = time.monotonic()
                fields = self.store.raw(self.job_id) or {}
                if fields.get("status") != RUNNING or fields.get("attempt") != str(self.attempt):
                    raise Abort("gone")
        except redis.RedisError as exc:  # Redis away for a moment (a restart): keep rendering
            log.warning("job %s: progress not recorded: %s", self.job_id, exc)

    def _fail(self, error: dict) -> str:
        self.store.remove_outputs(self.job_id, inputs=True)
        if retry_redis(lambda: self.store.transition(self.job_id, (RUNNING,), self.attempt, status=FAILED,
                                                     stage=self.progress.stage, progress=self.progress.progress,
                                                     error=error)):
            self.store.ended(self.job_id)
        return "failed"

    def _done(self, result, fields: dict) -> str:
        for name in os.listdir(self.job_dir):
            if name != result_name(self.attempt) and not name.startswith("job.json"):
                unlink(os.path.join(self.job_dir, name))  # inputs, the live copy, older attempts
        created = float(fields.get("created_at") or time.time())
        started = float(fields.get("started_at") or created)
        ended = retry_redis(lambda: self.store.transition(
            self.job_id, (RUNNING,), self.attempt, status=DONE, stage="encode", progress=1.0,
            timings=done_timings(result, created, started), duration=result.duration, frames=result.frames,
            engine=result.engine, size_bytes=dir_size(self.job_dir)))
        if not ended:  # cancelled at the last moment, or no longer ours
            self.store.remove_outputs(self.job_id)
            return "cancelled"
        self.store.ended(self.job_id)
        return "done"


class LipsyncWorker(SimpleWorker):
    """RQ's SimpleWorker (jobs run in this process: no fork, the models stay loaded) with
    heartbeats *during* a job, every ``heartbeat_interval`` s, expiring after three of them."""

    heartbeat_interval = 5.0

    @property
    def heartbeat_ttl(self) -> int:
        return max(2, math.ceil(3 * self.heartbeat_interval))

    def get_heartbeat_ttl(self, job: RQJob) -> int:
        return self.heartbeat_ttl

    def execute_job(self, job: RQJob, queue) -> None:
        self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, done), name="lipsync-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: RQJob, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_interval):
            try:
                if self.execution is not None:
                    self.maintain_heartbeats(job)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("heartbeat failed: %s", exc)


def serve(service, settings, *, on_job_end: Callable[[dict], None] | None = None,
          job_links: Callable[[str], dict] | None = None, burst: bool = False) -> int:
    """Run a worker until SIGTERM (finishing the running job first); ``service`` is loaded here.
    Returns the exit status (1 when the pipeline failed to load)."""
    global _runtime
    service.load()
    if service.status != "ready":
        log.error("the pipeline failed to load: %s", service.error)
        return 1
    connection = connect(settings.queue_url)
    name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    _runtime = WorkerRuntime(service, settings, connection, name=name, on_job_end=on_job_end, job_links=job_links)
    _runtime.start()
    worker = LipsyncWorker([QUEUE_NAME], connection=connection, name=name)
    worker.heartbeat_interval = settings.worker_heartbeat_seconds
    worker.push_exc_handler(_runtime.store.on_abandoned)  # RQ's own registry cleanup, at start
    log.info("worker %s ready: engine %s", name, service.describe().get("engine"))
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        _runtime.stop()
        _runtime = None
    return 0


__all__ = ["LipsyncWorker", "WorkerRuntime", "run_job", "serve"]
