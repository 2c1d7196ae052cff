"""The cluster's job backend: records in Redis, dispatch by RQ, files on shared storage.

``QUEUE_URL=redis://...`` makes the web app use ``RedisJobQueue``: web processes only check,
enqueue and read; ``python -m lipsync worker`` processes (``lipsync.jobs.worker``, one per GPU)
render. Any web node answers any job: everything about a job lives in Redis or in the folder
every node mounts (``OUTPUT_DIR``)::

    lipsync:job:<id>             hash: the job's state (as JobQueue.get answers) + request, attempt
    rq:queue:lipsync, rq:job:<id>  RQ's queue and job (the RQ job id is the job id)
    lipsync:ended:<status>       zset id -> finished_at (metrics: jobs by status)
    lipsync:idempotency:<sha256> "<job id> <fingerprint>" of an Idempotency-Key
    lipsync:webhooks             zset id -> when to send again if no sender confirmed by then
    lipsync:cancel               pub/sub channel: a cancelled running job's id, to its worker
    lipsync:cleanup              lease: the node running expiry/disk cap now (SET NX EX)
    <OUTPUT_DIR>/jobs/<id>/      inputs, live-<attempt>.mp4 while running, video-<attempt>.mp4,
                                 job.json: the final record (a Redis restart loses no result)

Where this backend decides (the job semantics are ``lipsync.jobs.queue``'s):

* Every transition is one Lua script conditional on the status (and, for a worker, on its
  attempt number), as the SQLite store's conditional UPDATEs: whoever moves a job first wins.
* A dead worker (SIGKILL, lost machine) stops heartbeating; RQ's ``StartedJobRegistry`` then
  holds the job past its expiry, and the registry cleanup (run by one web node at a time under
  RQ's maintenance lock, every ``WORKER_HEARTBEAT_SECONDS``) calls ``on_abandoned``: the job
  goes back to ``queued`` while RQ's ``Retry`` has attempts left, else ``failed`` with code
  ``worker_lost``. Output file names carry the attempt, so a worker presumed dead that still
  writes cannot spoil the next attempt's files.
* Ended jobs: the final record is written to ``job.json`` beside the video; the Redis hash then
  expires with the results (``JOB_TTL_SECONDS``). Reads fall back to ``job.json``.
* Expiry and the disk cap scan the shared folder, on one node at a time (a Redis lease,
  once per ``cleanup_interval`` in the whole cluster).
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

import redis
from rq import Queue, Retry
from rq.exceptions import AbandonedJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.registry import StartedJobRegistry, clean_registries

from lipsync.jobs.common import (
    AVATAR_NAME,
    RECORDING_NAME,
    check_request,
    follow_states,
    idempotency_in_flight,
    idempotency_key_hash,
    idempotency_mismatch,
    queue_full_error,
    unlink,
    webhook_payload,
    write_inputs,
)
from lipsync.jobs.queue import Job, JobQueue, JobRequest
from lipsync.jobs.store import (
    CANCELLED,
    DONE,
    FAILED,
    FINAL_STATUSES,
    QUEUED,
    RUNNING,
    STATUSES,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    iso_utc,
    new_job_id,
    valid_job_id,
)
from lipsync.jobs.webhooks import WebhookSender

log = logging.getLogger("lipsync.jobs")

QUEUE_NAME = "lipsync"
JOB_FUNCTION = "lipsync.jobs.worker.run_job"
PREFIX = "lipsync:"
CANCEL_CHANNEL = PREFIX + "cancel"
WEBHOOKS_KEY = PREFIX + "webhooks"
CLEANUP_KEY = PREFIX + "cleanup"
RECORD_NAME = "job.json"
WORKER_LOST = {"error": "the worker running this job was lost too many times (killed or its machine gone)",
               "code": "worker_lost"}
JOB_TIMEOUT = {"error": "the job ran longer than JOB_TIMEOUT_SECONDS", "code": "job_timeout"}
REDIS_RETRY_SECONDS = 60.0  # how long a final state keeps being written while Redis is away (a restart)

# KEYS[1] the job's hash, KEYS[2] the ended zset of the new status. ARGV: allowed statuses
# (",queued,running,"), the attempt the caller runs ("" = any), finished_at ("" = not final),
# seconds until the hash expires ("" = never), then field/value pairs.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not string.find(ARGV[1], ',' .. status .. ',', 1, true) then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], redis.call('HGET', KEYS[1], 'id')) end
if ARGV[4] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"""
# KEYS[1] the job's hash; ARGV: started_at, worker name. Queued -> running, the attempt counted.
_START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return false end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'stage', '', 'progress', '0', 'started_at', ARGV[1],
           'worker', ARGV[2])
return attempt
"""


def connect(url: str) -> redis.Redis:
    """A Redis client for ``QUEUE_URL`` (bytes, as RQ needs; reconnects by itself after a restart)."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30)


def result_name(attempt: int) -> str:
    return f"video-{attempt}.mp4"


def live_name(attempt: int) -> str:
    return f"live-{attempt}.mp4"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value) -> float | None:
    value = _text(value)
    return float(value) if value not in (None, "") else None


def retry_redis(action: Callable[[], object], seconds: float = REDIS_RETRY_SECONDS):
    """``action()``, tried again while Redis is unreachable (a restart) for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    pause = 0.2
    while True:
        try:
            return action()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("redis unreachable (%s); retrying in %.1f s", exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


class RedisJobStore:
    """The job records in Redis and their files on shared storage, for web nodes and workers alike.

    ``webhooks`` (started by the owner) sends the final state of the jobs this process ends;
    ``job_links`` adds the web layer's URLs to it (as ``LocalJobQueue`` does)."""

    def __init__(self, connection: redis.Redis, settings, *, webhooks: WebhookSender | None = None,
                 job_links: Callable[[str], dict] | None = None):
        self.redis = connection
        self.settings = settings
        self.jobs_dir = os.path.abspath(os.path.join(settings.output_dir, "jobs"))
        os.makedirs(self.jobs_dir, exist_ok=True)
        self.queue = Queue(QUEUE_NAME, connection=connection)
        self.webhooks = webhooks
        self.job_links = job_links
        self._transition = connection.register_script(_TRANSITION)
        self._start = connection.register_script(_START)

    # ------------------------------------------------------------ records
    def job_dir(self, job_id: str) -> str:
        if not valid_job_id(job_id):  # the only way an id becomes a path
            raise ValueError(f"invalid job id {job_id!r}")
        return os.path.join(self.jobs_dir, job_id)

    def create(self, job_id: str, *, stored: dict, callback_url: str | None, idempotency: str | None) -> None:
        """Record a queued job and hand it to RQ (bounded retries: ``JOB_MAX_ATTEMPTS`` runs in all)."""
        fields = {"id": job_id, "status": QUEUED, "stage": "", "progress": "0", "created_at": repr(time.time()),
                  "request": json.dumps(stored), "callback_url": callback_url or "", "attempt": "0",
                  "timings": "{}", "idempotency": idempotency or ""}
        self.redis.hset(job_key(job_id), mapping=fields)
        retries = self.settings.job_max_attempts - 1
        try:
            self.queue.enqueue(JOB_FUNCTION, job_id, job_id=job_id, retry=Retry(max=retries) if retries else None,
                               job_timeout=int(self.settings.job_timeout_seconds), result_ttl=60,
                               failure_ttl=max(60, int(self.settings.job_ttl_seconds) or 86400),
                               description=f"lipsync job {job_id}")
        except BaseException:
            self.redis.delete(job_key(job_id))
            raise

    def raw(self, job_id: str) -> dict | None:
        """The job's fields (strings) from Redis, else from its ``job.json``; None when unknown."""
        if not valid_job_id(job_id):
            return None
        fields = {_text(k): _text(v) for k, v in self.redis.hgetall(job_key(job_id)).items()}
        if fields.get("status"):
            return fields
        return self.read_record(job_id)

    def get(self, job_id: str) -> dict | None:
        """The public state (``JobQueue.get``)."""
        fields = self.raw(job_id)
        if fields is None:
            return None
        ttl = self.settings.job_ttl_seconds
        finished = _float(fields.get("finished_at"))
        if ttl and ttl > 0 and finished is not None and finished < time.time() - ttl:
            return None  # expired; the cleanup removes it
        position = None
        if fields["status"] == QUEUED:
            found = self.queue.get_job_position(job_id)
            position = 1 if found is None else found + 1  # None: a worker is taking it right now
        return public_state(fields, position)

    def start(self, job_id: str, worker: str) -> int | None:
        """Queued -> running for ``worker``; the attempt number, None when the job is not queued."""
        attempt = self._start(keys=[job_key(job_id)], args=[repr(time.time()), worker])
        return None if attempt is None else int(attempt)

    def transition(self, job_id: str, from_statuses: tuple[str, ...], attempt: int | None = None,
                   **values) -> bool:
        """Set ``values`` (None -> empty) when the job is in ``from_statuses`` (and runs ``attempt``).
        A final ``status`` also stamps ``finished_at``, marks the webhook pending and sets the
        hash's expiry. True when this call made the change."""
        status = values.get("status")
        final = status in FINAL_STATUSES
        now = time.time()
        if final:
            values.setdefault("finished_at", now)
            values["webhook_state"] = WEBHOOK_PENDING
        ttl = self.settings.job_ttl_seconds
        expire = str(int(ttl) + 3600) if final and ttl and ttl > 0 else ""
        pairs = []
        for name, value in values.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
            pairs += [name, "" if value is None else repr(value) if isinstance(value, float) else str(value)]
        changed = self._transition(keys=[job_key(job_id), f"{PREFIX}ended:{status or 'none'}"],
                                   args=[f",{','.join(from_statuses)},", "" if attempt is None else str(attempt),
                                         repr(values["finished_at"]) if final else "", expire, *pairs])
        return bool(changed)

    def update_progress(self, job_id: str, attempt: int, stage: str | None, progress: float) -> bool:
        return self.transition(job_id, (RUNNING,), attempt, stage=stage, progress=progress)

    # ------------------------------------------------------------ the end of a job
    def ended(self, job_id: str) -> None:
        """After this process moved the job to a final state: write ``job.json``, send the webhook."""
        fields = retry_redis(lambda: self.raw(job_id))
        if fields is None:
            return
        self.write_record(job_id, fields)
        self.send_webhook(job_id, fields)

    def write_record(self, job_id: str, fields: dict) -> None:
        """The final record beside the job's files (atomically: a reader sees all of it or none)."""
        folder = self.job_dir(job_id)
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, f".{RECORD_NAME}.{uuid.uuid4().hex}")
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(fields, f)
        os.replace(temp, os.path.join(folder, RECORD_NAME))

    def read_record(self, job_id: str) -> dict | None:
        try:
            with open(os.path.join(self.job_dir(job_id), RECORD_NAME), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def remove_outputs(self, job_id: str, *, inputs: bool = False) -> None:
        """Remove the videos (live and final) of every attempt, and with ``inputs`` the uploads;
        ``job.json`` stays."""
        folder = self.job_dir(job_id)
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            if name.startswith(("live-", "video-")) or (inputs and name in (RECORDING_NAME, AVATAR_NAME)):
                unlink(os.path.join(folder, name))

    def delete(self, job_id: str) -> None:
        """Remove an ended job everywhere: record, idempotency key, files."""
        fields = self.raw(job_id) or {}
        with self.redis.pipeline() as pipe:
            pipe.delete(job_key(job_id))
            if fields.get("idempotency"):
                pipe.delete(fields["idempotency"])
            for status in FINAL_STATUSES:
                pipe.zrem(f"{PREFIX}ended:{status}", job_id)
            pipe.zrem(WEBHOOKS_KEY, job_id)
            pipe.execute()
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    # ------------------------------------------------------------ webhooks
    def send_webhook(self, job_id: str, fields: dict | None = None) -> None:
        """Queue the final state's webhook (if the job has a callback_url) in this process's sender;
        if no one confirms it in time, the cleanup sends it again (at least once)."""
        fields = fields or self.raw(job_id)
        if self.webhooks is None or not fields or not fields.get("callback_url"):
            return
        s = self.settings
        deadline = time.time() + (s.webhook_retries + 1) * (s.webhook_timeout + 30) + 60
        self.redis.zadd(WEBHOOKS_KEY, {job_id: deadline})
        self.webhooks.send(fields["callback_url"], webhook_payload(public_state(fields, None), self.job_links),
                           key=job_id)

    def webhook_result(self, job_id: str | None, delivered: bool, attempts: int, error: str | None) -> None:
        """``WebhookSender``'s on_result: the delivery is settled, one way or the other."""
        if not job_id:
            return
        self.redis.zrem(WEBHOOKS_KEY, job_id)
        self.transition(job_id, tuple(FINAL_STATUSES),
                        webhook_state=WEBHOOK_DELIVERED if delivered else WEBHOOK_FAILED)

    # ------------------------------------------------------------ dead workers
    def on_abandoned(self, rq_job: RQJob, exc_type, exc_value, traceback) -> bool:
        """RQ's exception handler: for a job whose worker stopped heartbeating (``AbandonedJobError``)
        our record follows RQ's decision: back to queued while RQ retries it, else ``failed``
        with code ``worker_lost``. Other exceptions fall through to RQ's handling."""
        if exc_type is not AbandonedJobError or not valid_job_id(rq_job.id):
            return True
        job_id = rq_job.id
        self.remove_outputs(job_id)
        if rq_job.retries_left and rq_job.retries_left > 0:
            if self.transition(job_id, (QUEUED, RUNNING), status=QUEUED, stage=None, progress=0.0):
                log.warning("job %s: its worker was lost; queued again (%d attempt(s) left)", job_id,
                            rq_job.retries_left)
        elif self.transition(job_id, (QUEUED, RUNNING), status=FAILED, error=WORKER_LOST):
            log.error("job %s: its worker was lost too often; failed (worker_lost)", job_id)
            self.remove_outputs(job_id, inputs=True)
            self.ended(job_id)
        return True

    def reap_dead_workers(self) -> None:
        """RQ's registry cleanup (abandoned jobs -> ``on_abandoned``), by one node at a time under
        RQ's own maintenance lock. The lock's lease is cut from RQ's 15 minutes to 30 s, so a node
        that dies holding it delays the next cleanup by 30 s at most."""
        if not self.queue.acquire_maintenance_lock():
            return
        try:
            self.redis.expire(self.queue.registry_cleaning_key, 30)
            clean_registries(self.queue, exception_handlers=[self.on_abandoned])
        finally:
            self.queue.release_maintenance_lock()

    # ------------------------------------------------------------ expiry
    def cleanup(self, orphan_grace: float = 60.0) -> dict:
        """Expire ended jobs older than ``JOB_TTL_SECONDS``, remove the oldest results above
        ``JOB_DISK_CAP_BYTES``, drop folders no record knows, send webhooks nobody confirmed.
        Scans the shared folder: it holds every ended job's ``job.json``, whatever Redis lost."""
        removed = {"expired": 0, "over_cap": 0, "orphans": 0, "webhooks": 0}
        now = time.time()
        ttl, cap = self.settings.job_ttl_seconds, self.settings.job_disk_cap_bytes
        done = []
        for name in os.listdir(self.jobs_dir):
            if not valid_job_id(name):
                continue
            record = self.read_record(name)
            if record is None:
                status = _text(self.redis.hget(job_key(name), "status"))
                if status in FINAL_STATUSES:  # its writer died before job.json: write it now
                    self.write_record(name, self.raw(name))
                elif status is None and _older_than(os.path.join(self.jobs_dir, name), now - orphan_grace):
                    shutil.rmtree(os.path.join(self.jobs_dir, name), ignore_errors=True)
                    removed["orphans"] += 1
                continue
            finished = _float(record.get("finished_at")) or now
            if ttl and ttl > 0 and finished < now - ttl:
                self.delete(name)
                removed["expired"] += 1
            elif record.get("status") == DONE:
                done.append((finished, name, int(_float(record.get("size_bytes")) or 0)))
        if cap and cap > 0:
            total = sum(size for _, _, size in done)
            for _, name, size in sorted(done):
                if total <= cap:
                    break
                self.delete(name)
                removed["over_cap"] += 1
                total -= size
        for ttl_key in (f"{PREFIX}ended:{status}" for status in FINAL_STATUSES):
            if ttl and ttl > 0:
                self.redis.zremrangebyscore(ttl_key, 0, now - ttl)
        for member in self.redis.zrangebyscore(WEBHOOKS_KEY, 0, now):
            removed["webhooks"] += 1
            self.send_webhook(_text(member))
        if any(removed.values()):
            log.info("job cleanup: %s", removed)
        return removed

    def status_counts(self) -> dict[str, int]:
        """Jobs per status, for metrics: queued from RQ's queue, running from its started registry."""
        counts = dict.fromkeys(STATUSES, 0)
        counts[QUEUED] = self.queue.count
        counts[RUNNING] = StartedJobRegistry(queue=self.queue).count
        for status in FINAL_STATUSES:
            counts[status] = int(self.redis.zcard(f"{PREFIX}ended:{status}"))
        return counts


def public_state(fields: dict, queue_position: int | None) -> dict:
    """A record's fields (strings, as stored) as ``JobQueue.get`` answers them."""
    def number(name):
        value = _float(fields.get(name))
        return None if value is None else value

    error = fields.get("error")
    frames = number("frames")
    return {
        "id": fields["id"],
        "status": fields["status"],
        "stage": fields.get("stage") or None,
        "progress": round(number("progress") or 0.0, 4),
        "queue_position": queue_position,
        "error": json.loads(error) if error else None,
        "timings": json.loads(fields.get("timings") or "{}"),
        "created_at": iso_utc(number("created_at")),
        "started_at": iso_utc(number("started_at")),
        "finished_at": iso_utc(number("finished_at")),
        "duration": number("duration"),
        "frames": None if frames is None else int(frames),
        "engine": fields.get("engine") or None,
        "language": json.loads(fields.get("request") or "{}").get("language"),
        "callback_url": fields.get("callback_url") or None,
    }


def _older_than(path: str, cutoff: float) -> bool:
    try:
        return os.path.getmtime(path) < cutoff
    except OSError:
        return False


class RedisJobQueue(JobQueue):
    """``JobQueue`` for web nodes in cluster mode: submit, read, follow and cancel jobs kept in
    Redis and rendered by ``python -m lipsync worker`` processes anywhere.

    ``service`` validates submissions (the web node loads it as usual); ``start()`` runs the
    cluster's upkeep on this node while it holds the turn: dead-worker recovery every
    ``WORKER_HEARTBEAT_SECONDS``, expiry and webhook re-sends every ``cleanup_interval``."""

    def __init__(self, service, settings, *, connection: redis.Redis | None = None, poll_interval: float = 0.1,
                 cleanup_interval: float = 60.0, webhook_backoff: float = 1.0,
                 job_links: Callable[[str], dict] | None = None):
        self.service = service
        self.settings = settings
        self.poll_interval = float(poll_interval)
        self.cleanup_interval = float(cleanup_interval)
        self.node = uuid.uuid4().hex
        self.redis = connection or connect(settings.queue_url)
        self.webhooks = WebhookSender(settings.webhook_secret, retries=settings.webhook_retries,
                                      timeout=settings.webhook_timeout, backoff=webhook_backoff,
                                      on_result=self._webhook_result)
        self.store = RedisJobStore(self.redis, settings, webhooks=self.webhooks, job_links=job_links)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self.webhooks.start()
        self._thread = threading.Thread(target=self._upkeep, name="lipsync-cluster-upkeep", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the upkeep and the webhook sender (jobs run on in the workers)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.webhooks.stop(timeout=max(0.1, timeout / 2))

    def _upkeep(self) -> None:
        while not self._stopping.wait(self.settings.worker_heartbeat_seconds):
            try:
                self.store.reap_dead_workers()
                # the cleanup's turn: one node per interval in the whole cluster
                if self.redis.set(CLEANUP_KEY, self.node, nx=True, ex=max(1, int(self.cleanup_interval))):
                    self.store.cleanup()
            except redis.RedisError as exc:
                log.warning("cluster upkeep: redis: %s", exc)
            except Exception:  # noqa: BLE001 - the upkeep must survive anything
                log.exception("cluster upkeep failed")

    def _webhook_result(self, *args) -> None:
        try:
            self.store.webhook_result(*args)
        except redis.RedisError as exc:  # recorded later by a re-send
            log.warning("webhook result not recorded: %s", exc)

    # ------------------------------------------------------------ submit
    def submit(self, request: JobRequest) -> Job:
        """See ``JobQueue.submit``; an ``idempotency_key`` names the job it made while that job lives
        (per owner; another request under the key: 422, its first submission still running: 409)."""
        checked = check_request(self.service, self.settings, request)
        idem_key = None
        if checked.fingerprint is not None:
            idem_key = f"{PREFIX}idempotency:{idempotency_key_hash(request)}"
            earlier = self._claim_idempotency_key(idem_key, checked.fingerprint)
            if earlier is not None:
                return earlier
        job_id = new_job_id()
        job_dir = self.store.job_dir(job_id)
        try:
            if self.store.queue.count >= self.settings.job_queue_size:
                raise queue_full_error(self.settings.job_queue_size, None)
            write_inputs(job_dir, checked)
            self.store.create(job_id, stored=checked.stored, callback_url=checked.callback_url, idempotency=idem_key)
            if idem_key is not None:
                self.redis.set(idem_key, f"{job_id} {checked.fingerprint}", ex=self._idempotency_seconds())
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            if idem_key is not None:
                self.redis.delete(idem_key)
            raise
        return Job.from_dict(self.store.get(job_id))

    def _idempotency_seconds(self) -> int:
        ttl = self.settings.job_ttl_seconds
        return int(ttl) + 3600 if ttl and ttl > 0 else 30 * 86400

    def _claim_idempotency_key(self, key: str, fingerprint: str) -> Job | None:
        """Take ``key`` for a new job (None), or the job it made before."""
        for _ in range(3):
            if self.redis.set(key, f"- {fingerprint}", nx=True, ex=60):  # "-": being submitted
                return None
            value = _text(self.redis.get(key))
            if value is None:
                continue
            job_id, _, earlier = value.partition(" ")
            if earlier != fingerprint:
                raise idempotency_mismatch()
            if job_id == "-":
                raise idempotency_in_flight()
            state = self.store.get(job_id)
            if state is not None:
                return Job.from_dict(state)
            self.redis.delete(key)  # its job is gone (deleted, expired): the key is free again
        raise idempotency_in_flight()

    # ------------------------------------------------------------ reads
    def get(self, job_id: str) -> dict | None:
        return self.store.get(job_id)

    def result_path(self, job_id: str) -> str | None:
        return self._file_while(job_id, DONE, result_name)

    def live_path(self, job_id: str) -> str | None:
        return self._file_while(job_id, RUNNING, live_name)

    def _file_while(self, job_id: str, status: str, name: Callable[[int], str]) -> str | None:
        fields = self.store.raw(job_id)
        if fields is None or fields["status"] != status:
            return None
        path = os.path.join(self.store.job_dir(job_id), name(int(fields.get("attempt") or 0)))
        return path if os.path.isfile(path) else None

    def events(self, job_id: str, timeout: float | None = None, *,
               heartbeat: float | None = None) -> Iterator[dict | None]:
        """See ``JobQueue.events``: Redis is polled every ``poll_interval`` s (any node, any worker)."""
        if not valid_job_id(job_id):
            return iter(())
        return follow_states(lambda: self.store.get(job_id), lambda pause: time.sleep(min(pause, self.poll_interval)),
                             timeout, heartbeat)

    # ------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job (taken out of RQ's queue) or a running one (its worker hears it on
        ``lipsync:cancel`` and stops within a progress report), or delete an ended one."""
        for _ in range(5):  # each pass either acts or saw the job move on
            fields = self.store.raw(job_id)
            if fields is None:
                return False
            status = fields["status"]
            if status in FINAL_STATUSES:
                self.store.delete(job_id)
                return True
            if self.store.transition(job_id, (status,), status=CANCELLED):
                if status == QUEUED:
                    self._remove_from_rq(job_id)
                else:
                    self.redis.publish(CANCEL_CHANNEL, job_id)
                self.store.remove_outputs(job_id, inputs=True)
                self.store.ended(job_id)
                return True
        return False

    def _remove_from_rq(self, job_id: str) -> None:
        try:
            RQJob.fetch(job_id, connection=self.redis).cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass  # a worker took it meanwhile: it finds the job cancelled and skips it
