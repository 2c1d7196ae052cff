"""Job records in SQLite: ``<output_dir>/jobs.sqlite3`` (WAL mode).

The store is the single source of truth for a job's state, so any process
that opens the same file sees the same jobs. Every state change is one
conditional ``UPDATE`` (``... WHERE status = 'running'``), which makes the
transitions race-free between the engine worker, ``cancel()`` from a web
thread, the cleanup thread and even another process: whoever moves a job to
a final state first wins, and the loser learns it from the row count.

Times are stored as Unix seconds (REAL) and rendered as ISO 8601 UTC.
Ids are 32 lowercase hex characters (``uuid4().hex``); ``valid_job_id`` is
the only gate between an outside string and anything built from it.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINAL_STATUSES = frozenset((DONE, FAILED, CANCELLED))

# Webhook delivery state of a finished job that has a callback_url.
WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"

_ID_RE = re.compile(r"[0-9a-f]{32}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order (queue order)
    id            TEXT    NOT NULL UNIQUE,
    status        TEXT    NOT NULL,
    stage         TEXT,
    progress      REAL    NOT NULL DEFAULT 0,
    error         TEXT,                                -- JSON {"error", "code"} or NULL
    timings       TEXT    NOT NULL DEFAULT '{}',       -- JSON {stage: ms}
    created_at    REAL    NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    duration      REAL,
    frames        INTEGER,
    engine        TEXT,
    callback_url  TEXT,
    request       TEXT    NOT NULL DEFAULT '{}',       -- JSON: text, language, input file names
    size_bytes    INTEGER NOT NULL DEFAULT 0,          -- bytes kept on disk for a done job
    owner         TEXT,                                -- queue instance that claimed it (running jobs)
    webhook_state TEXT                                 -- NULL | pending | delivered | failed
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
-- Idempotency-Key -> the job it made; a row lives as long as its job's record
CREATE TABLE IF NOT EXISTS idempotency (
    scope        TEXT NOT NULL,                        -- the API key id ('-' without keys)
    key_hash     TEXT NOT NULL,                        -- sha256 of scope and key
    fingerprint  TEXT NOT NULL,                        -- sha256 of what the request asked for
    job_id       TEXT NOT NULL,
    PRIMARY KEY (scope, key_hash)
);
CREATE INDEX IF NOT EXISTS idempotency_job ON idempotency (job_id);
"""

_PUBLIC_FIELDS = ("id", "status", "stage", "progress", "queue_position", "error", "timings", "created_at",
                  "started_at", "finished_at", "duration", "frames", "engine", "language", "callback_url")


def new_job_id() -> str:
    """A fresh random job id: 32 lowercase hex characters (122 random bits)."""
    return uuid.uuid4().hex


def valid_job_id(job_id) -> bool:
    """True only for strings shaped exactly like ``new_job_id()`` output."""
    return isinstance(job_id, str) and _ID_RE.fullmatch(job_id) is not None


def iso_utc(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore:
    """Thread-safe access to the jobs table through a small pool of SQLite connections.

    Each method takes a connection for its whole run (rows fetched, transaction ended) and
    gives it back. At most ``pool_size`` connections exist, whatever the number of threads
    (a threaded server starts one per request): a caller waits for a free one (statements
    take well under a millisecond), the most recently used first. The cap is on all
    connections, not only idle ones, because closing one does not close its file: SQLite
    keeps the descriptor of a closed connection open for as long as another connection of
    the process holds a lock on the same database (POSIX locks belong to the process), which
    in WAL mode is always. Opening and closing extra connections under load is how one
    connection per thread became hundreds of open files.
    """

    def __init__(self, path: str, pool_size: int = 8, wait_seconds: float = 60.0):
        self.path = path
        self.pool_size = int(pool_size)
        self.wait_seconds = float(wait_seconds)
        self._slots = threading.BoundedSemaphore(self.pool_size)
        self._idle: list[sqlite3.Connection] = []  # LIFO: the warmest connection is reused first
        self._lock = threading.Lock()
        self._generation = 0  # bumped by close(): connections in use then are closed when given back
        self._in_use = 0
        with self._connection() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.execute("PRAGMA user_version = 1")

    # ----------------------------------------------------------- connections
    def _open(self) -> sqlite3.Connection:
        # autocommit; multi-statement changes use explicit BEGIN IMMEDIATE
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection of the pool for one method (waiting for one when all are in use)."""
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise sqlite3.OperationalError(f"no free job-store connection within {self.wait_seconds:.0f} s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
                generation = self._generation
                self._in_use += 1
            try:
                if conn is None:
                    conn = self._open()
                yield conn
            finally:
                with self._lock:
                    self._in_use -= 1
                if conn is not None:
                    self._give_back(conn, generation)
        finally:
            self._slots.release()

    def _give_back(self, conn: sqlite3.Connection, generation: int) -> None:
        try:
            if conn.in_transaction:  # never hand on a half-done transaction
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            _close(conn)
            return
        with self._lock:
            if generation == self._generation:
                self._idle.append(conn)
                return
        _close(conn)

    def _all(self, sql: str, params=()) -> list[sqlite3.Row]:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params=()) -> sqlite3.Row | None:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchone()

    def _change(self, sql: str, params=()) -> int:
        """Run a changing statement; the number of rows it changed."""
        with self._connection() as conn:
            return conn.execute(sql, params).rowcount

    def open_connections(self) -> int:
        """Connections open now (idle in the pool or in use)."""
        with self._lock:
            return len(self._idle) + self._in_use

    def close(self) -> None:
        """Close the pooled connections; one in use now is closed when given back. The store
        stays usable (the next call opens a new connection)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for conn in idle:
            _close(conn)

    # ---------------------------------------------------------------- create
    def insert(self, job_id: str, *, created_at: float, request: dict, callback_url: str | None,
               max_queued: int, idempotency: tuple[str, str, str] | None = None) -> bool | str:
        """Add a queued job unless ``max_queued`` jobs already wait; False when full.

        ``idempotency`` (scope, key hash, fingerprint) is recorded with the job in the same
        transaction; when that key is taken already nothing is inserted and the result is the
        string ``"taken"`` (``idempotent_job`` tells by whom)."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if idempotency is not None and conn.execute(
                        "SELECT 1 FROM idempotency WHERE scope = ? AND key_hash = ?", idempotency[:2]).fetchone():
                    conn.execute("ROLLBACK")
                    return "taken"
                waiting = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0]
                if waiting >= max_queued:
                    conn.execute("ROLLBACK")
                    return False
                conn.execute("INSERT INTO jobs (id, status, created_at, request, callback_url) VALUES (?, ?, ?, ?, ?)",
                             (job_id, QUEUED, created_at, json.dumps(request), callback_url))
                if idempotency is not None:
                    conn.execute("INSERT INTO idempotency (scope, key_hash, fingerprint, job_id) VALUES (?, ?, ?, ?)",
                                 (*idempotency, job_id))
                conn.execute("COMMIT")
                return True
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ read
    def row(self, job_id: str) -> sqlite3.Row | None:
        if not valid_job_id(job_id):
            return None
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> dict | None:
        """The public job record, or None for an unknown or malformed id."""
        if not valid_job_id(job_id):
            return None
        with self._connection() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else self._public(conn, row)

    def public(self, row: sqlite3.Row) -> dict:
        with self._connection() as conn:
            return self._public(conn, row)

    @staticmethod
    def _public(conn: sqlite3.Connection, row: sqlite3.Row) -> dict:
        position = None
        if row["status"] == QUEUED:
            ahead = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?",
                                 (QUEUED, row["seq"])).fetchone()[0]
            position = ahead + 1
        record = {
            "id": row["id"],
            "status": row["status"],
            "stage": row["stage"],
            "progress": round(float(row["progress"]), 4),
            "queue_position": position,
            "error": json.loads(row["error"]) if row["error"] else None,
            "timings": json.loads(row["timings"] or "{}"),
            "created_at": iso_utc(row["created_at"]),
            "started_at": iso_utc(row["started_at"]),
            "finished_at": iso_utc(row["finished_at"]),
            "duration": row["duration"],
            "frames": row["frames"],
            "engine": row["engine"],
            # the voice that speaks a text job ("auto" already resolved); None for a recording
            "language": json.loads(row["request"] or "{}").get("language"),
            "callback_url": row["callback_url"],
        }
        return {k: record[k] for k in _PUBLIC_FIELDS}

    def status(self, job_id: str) -> str | None:
        row = self._one("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else row["status"]

    def queued_count(self) -> int:
        return self._one("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,))[0]

    def status_counts(self) -> dict[str, int]:
        """Jobs per status (every status present, 0 when none), for metrics."""
        counts = dict.fromkeys(STATUSES, 0)
        for row in self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            counts[row["status"]] = int(row["n"])
        return counts

    def average_run_seconds(self, last: int = 20) -> float | None:
        """Mean wall time of the last ``last`` done jobs, None when there are none."""
        value = self._one(
            "SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs "
            "WHERE status = ? AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?)",
            (DONE, last))[0]
        return None if value is None else float(value)

    # ----------------------------------------------------------- transitions
    def claim_next(self, now: float, owner: str) -> sqlite3.Row | None:
        """Move the oldest queued job to running for ``owner`` and return it (None when none waits)."""
        with self._connection() as conn:
            while True:
                row = conn.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
                if row is None:
                    return None
                # MAX: ``now`` was read before this connection was free, possibly before a job
                # submitted meanwhile was created; a job never starts before it exists.
                cur = conn.execute("UPDATE jobs SET status = ?, started_at = MAX(?, created_at), stage = NULL, "
                                   "progress = 0, owner = ? WHERE id = ? AND status = ?",
                                   (RUNNING, now, owner, row["id"], QUEUED))
                if cur.rowcount == 1:
                    return conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
                # cancelled (or claimed elsewhere) between the SELECT and the UPDATE: try the next one

    def update_progress(self, job_id: str, stage: str | None, progress: float) -> bool:
        """Record progress of a running job; False when it is no longer running (cancelled, interrupted)."""
        return self._change("UPDATE jobs SET stage = ?, progress = ? WHERE id = ? AND status = ?",
                            (stage, progress, job_id, RUNNING)) == 1

    def finish(self, job_id: str, status: str, *, now: float, from_statuses: tuple[str, ...],
               stage: str | None = None, progress: float | None = None, error: dict | None = None,
               timings: dict | None = None, duration: float | None = None, frames: int | None = None,
               engine: str | None = None, size_bytes: int = 0) -> bool:
        """Move a job from one of ``from_statuses`` to a final ``status``; False when it was not in them.

        A job with a callback_url gets ``webhook_state = 'pending'`` in the same
        statement, so the webhook survives a crash between the two.
        """
        assert status in FINAL_STATUSES
        marks = ",".join("?" * len(from_statuses))
        return self._change(
            f"UPDATE jobs SET status = ?, finished_at = ?, stage = COALESCE(?, stage), "
            f"progress = COALESCE(?, progress), error = ?, timings = COALESCE(?, timings), duration = ?, "
            f"frames = ?, engine = ?, size_bytes = ?, "
            f"webhook_state = CASE WHEN callback_url IS NOT NULL THEN ? ELSE NULL END "
            f"WHERE id = ? AND status IN ({marks})",
            (status, now, stage, progress, json.dumps(error) if error else None,
             json.dumps(timings) if timings is not None else None, duration, frames, engine, size_bytes,
             WEBHOOK_PENDING, job_id, *from_statuses)) == 1

    def interrupt(self, now: float, error: dict, *, queued: bool, running_owners: set[str] | None) -> list[str]:
        """Mark jobs failed with ``error``: every queued job when ``queued``, and the running jobs
        whose owner is in ``running_owners`` (every running job when it is None). Returns their ids."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = []
                for r in conn.execute("SELECT id, status, owner FROM jobs WHERE status IN (?, ?) ORDER BY seq",
                                      (QUEUED, RUNNING)).fetchall():
                    if r["status"] == QUEUED and not queued:
                        continue
                    if r["status"] == RUNNING and running_owners is not None and r["owner"] not in running_owners:
                        continue
                    conn.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ?, "
                                 "webhook_state = CASE WHEN callback_url IS NOT NULL THEN ? ELSE NULL END "
                                 "WHERE id = ?", (FAILED, now, json.dumps(error), WEBHOOK_PENDING, r["id"]))
                    ids.append(r["id"])
                conn.execute("COMMIT")
                return ids
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def running_owners(self) -> set[str]:
        """Owners of the jobs running now."""
        return {r["owner"] for r in self._all("SELECT DISTINCT owner FROM jobs WHERE status = ?", (RUNNING,))}

    def delete(self, job_id: str, *, only_final: bool = True) -> bool:
        """Remove a job's record (by default only once it has ended) and its idempotency key."""
        if only_final:
            deleted = self._change("DELETE FROM jobs WHERE id = ? AND status IN (?, ?, ?)",
                                   (job_id, DONE, FAILED, CANCELLED)) == 1
        else:
            deleted = self._change("DELETE FROM jobs WHERE id = ?", (job_id,)) == 1
        if deleted:
            self._change("DELETE FROM idempotency WHERE job_id = ?", (job_id,))
        return deleted

    def idempotent_job(self, scope: str, key_hash: str) -> tuple[str, str] | None:
        """(job id, fingerprint) of the job made with this idempotency key, None when none."""
        row = self._one("SELECT job_id, fingerprint FROM idempotency WHERE scope = ? AND key_hash = ?",
                        (scope, key_hash))
        return None if row is None else (row["job_id"], row["fingerprint"])

    # --------------------------------------------------------------- cleanup
    def finished_before(self, cutoff: float) -> list[str]:
        """Ids of ended jobs that finished before ``cutoff`` (oldest first)."""
        return [r["id"] for r in self._all(
            "SELECT id FROM jobs WHERE status IN (?, ?, ?) AND finished_at < ? ORDER BY finished_at",
            (DONE, FAILED, CANCELLED, cutoff))]

    def done_sizes(self) -> list[tuple[str, int]]:
        """(id, bytes on disk) of every done job, oldest result first."""
        return [(r["id"], int(r["size_bytes"])) for r in self._all(
            "SELECT id, size_bytes FROM jobs WHERE status = ? ORDER BY finished_at, seq", (DONE,))]

    def all_ids(self) -> set[str]:
        return {r["id"] for r in self._all("SELECT id FROM jobs")}

    # -------------------------------------------------------------- webhooks
    def pending_webhooks(self) -> list[tuple[str, str]]:
        """(id, callback_url) of ended jobs whose webhook was not delivered yet."""
        return [(r["id"], r["callback_url"]) for r in self._all(
            "SELECT id, callback_url FROM jobs WHERE webhook_state = ? AND status IN (?, ?, ?) ORDER BY seq",
            (WEBHOOK_PENDING, DONE, FAILED, CANCELLED))]

    def set_webhook_state(self, job_id: str, state: str) -> None:
        self._change("UPDATE jobs SET webhook_state = ? WHERE id = ?", (state, job_id))

    def webhook_state(self, job_id: str) -> str | None:
        row = self.row(job_id)
        return None if row is None else row["webhook_state"]


def _close(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass
