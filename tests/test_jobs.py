"""The asynchronous jobs engine (lipsync.jobs): queue, records, cancel, restart, expiry, events.

Most tests drive ``LocalJobQueue`` with ``SlowService``, a small deterministic
stand-in for ``LipsyncService``: it really writes a file at ``out_path``
(through a partial file, like the MP4 writer), reports progress through every
stage while it works, and can be told per text to fail or to hold until
released. Everything else (SQLite, threads, files, locks) is the real thing.
One slow-marked test runs the real pipeline end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import pytest

from lipsync.errors import InvalidInputError, NoFaceError, PayloadTooLargeError
from lipsync.jobs import INTERRUPTED_ERROR, JobRequest, LocalJobQueue, QueueFullError, valid_job_id
from lipsync.settings import Settings
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = ("ru", "kk", "en")
RECORD_KEYS = {"id", "status", "stage", "progress", "queue_position", "error", "timings", "created_at",
               "started_at", "finished_at", "duration", "frames", "engine", "language", "callback_url"}


# ------------------------------------------------------------------ stand-in
@dataclass(frozen=True)
class FakeResult:
    """Same fields as lipsync.service.GenerationResult."""

    path: str
    duration: float
    frames: int
    engine: str
    timings: dict = field(default_factory=dict)


class SlowService:
    """Deterministic stand-in for LipsyncService (``generate`` + ``validate_text``).

    Per text: ``fail[text] = exc`` raises after TTS; ``hold(text)`` keeps the
    render going (still reporting progress every 10 ms, as the real pipeline
    does per batch) until ``release(text)``. The result file has exactly
    ``result_bytes`` bytes.
    """

    status = "ready"

    def __init__(self, steps: int = 8, step_delay: float = 0.01, result_bytes: int = 1000, max_text_chars: int = 200):
        self.steps = steps
        self.step_delay = step_delay
        self.result_bytes = result_bytes
        self.max_text_chars = max_text_chars
        self.fail: dict[str, Exception] = {}
        self.calls: list[dict] = []          # kwargs of every generate() call, in order
        self.aborted: list[str] = []         # texts whose render was stopped by an exception from progress
        self.progress_calls = 0
        self._holds: dict[str, threading.Event] = {}
        self._started: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def hold(self, text: str) -> None:
        self._holds[text] = threading.Event()

    def release(self, text: str) -> None:
        self._holds[text].set()

    def started(self, text: str, timeout: float = 5.0) -> bool:
        with self._lock:
            event = self._started.setdefault(text, threading.Event())
        return event.wait(timeout)

    def validate_text(self, text, language, allow_mismatch=False):
        if not isinstance(text, str):
            raise InvalidInputError("'text' must be a string", code="invalid_text")
        if not text.strip():
            raise InvalidInputError("'text' is empty", code="empty_text")
        if len(text) > self.max_text_chars:
            raise PayloadTooLargeError("'text' is too long", code="text_too_long")
        if language not in LANGUAGES:
            raise InvalidInputError("bad language", code="unsupported_language")
        return text, language

    def generate(self, out_path, *, text=None, language=None, recording=None, avatar_image=None, progress=None,
                 allow_mismatch=False, live_path=None):
        report = progress or (lambda stage, fraction: None)

        def tick(stage, fraction):
            self.progress_calls += 1
            report(stage, fraction)

        key = text if recording is None else "<recording>"
        self.calls.append({"text": text, "language": language, "recording": recording,
                           "avatar_image": avatar_image, "out_path": out_path})
        with self._lock:
            self._started.setdefault(key, threading.Event()).set()
        partial = out_path + ".part"
        try:
            tick("tts", 0.0)
            time.sleep(self.step_delay)
            tick("tts", 1.0)
            if key in self.fail:
                raise self.fail[key]
            with open(partial, "wb") as f:
                for i in range(self.steps):
                    time.sleep(self.step_delay)
                    hold = self._holds.get(key)
                    while hold is not None and not hold.wait(0.01):
                        tick("lipsync", i / self.steps)
                    tick("lipsync", (i + 1) / self.steps)
                tick("encode", 0.0)
                f.write(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * (self.result_bytes - 12))
                tick("encode", 1.0)
            os.replace(partial, out_path)
        except BaseException as exc:
            if exc is not self.fail.get(key):
                self.aborted.append(key)
            if os.path.exists(partial):
                os.remove(partial)
            raise
        return FakeResult(path=out_path, duration=1.0, frames=25, engine="slow-fake",
                          timings={"tts": 1.0, "lipsync": 2.0, "encode": 3.0, "total": 6.0})


# ------------------------------------------------------------------ fixtures
def make_settings(tmp_path, **overrides) -> Settings:
    values = dict(output_dir=str(tmp_path / "outputs"), cache_dir=str(tmp_path / "cache"), job_queue_size=8,
                  job_ttl_seconds=3600.0, job_disk_cap_bytes=10**9, webhook_secret="test-secret",
                  webhook_retries=3, webhook_timeout=2.0, max_upload_bytes=10_000)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_queue(tmp_path):
    """make_queue(service=None, start=True, settings=None, **setting_overrides_and_queue_kwargs)."""
    made: list[LocalJobQueue] = []
    queue_kwargs = ("cleanup_interval", "progress_interval", "webhook_backoff", "poll_interval", "orphan_grace",
                    "on_job_end")

    def make(service=None, *, start=True, settings=None, **kwargs):
        qk = {k: kwargs.pop(k) for k in list(kwargs) if k in queue_kwargs}
        settings = settings or make_settings(tmp_path, **kwargs)
        q = LocalJobQueue(service or SlowService(), settings, **qk)
        made.append(q)
        if start:
            q.start()
        return q

    yield make
    for q in made:
        for held in getattr(q.service, "_holds", {}).values():
            held.set()
        q.stop(timeout=5)


wait_for = wait_until  # tests/conftest.py: poll a condition up to a deadline, fail clearly on timeout


def job_dir(q: LocalJobQueue, job_id: str) -> Path:
    return Path(q.settings.output_dir) / "jobs" / job_id


def parse_iso(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --------------------------------------------------------------- happy path
def test_submit_runs_to_done_with_increasing_progress_and_a_result(make_queue):
    service = SlowService(steps=10, step_delay=0.02)
    q = make_queue(service)
    job = q.submit(JobRequest(text="Hello there", language="en"))
    assert valid_job_id(job.id) and job.status in ("queued", "running")
    assert set(job.to_dict()) == RECORD_KEYS

    seen = list(q.events(job.id, timeout=10))
    final = seen[-1]
    assert final["status"] == "done", final
    statuses = [s["status"] for s in seen]
    assert statuses.index("running") < statuses.index("done") and statuses.count("done") == 1
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress), progress
    running = [s for s in seen if s["status"] == "running"]
    assert len({s["progress"] for s in running}) >= 3, running
    assert all(0.0 <= s["progress"] < 1.0 for s in running)
    assert {"tts", "lipsync"} <= {s["stage"] for s in running}  # states are sampled: quick ones may coalesce

    assert final["progress"] == 1.0 and final["stage"] == "encode" and final["error"] is None
    assert final["queue_position"] is None
    assert final["frames"] == 25 and final["duration"] == 1.0 and final["engine"] == "slow-fake"
    assert final["timings"]["total"] == 6.0 and final["timings"]["queue_wait"] >= 0
    created, started, finished = (parse_iso(final[k]) for k in ("created_at", "started_at", "finished_at"))
    assert created <= started <= finished
    assert q.get(job.id) == final

    path = q.result_path(job.id)
    assert path == str(job_dir(q, job.id) / "video.mp4")
    data = Path(path).read_bytes()
    assert len(data) == service.result_bytes and data[4:8] == b"ftyp"
    assert os.listdir(job_dir(q, job.id)) == ["video.mp4"]
    assert service.calls[0]["text"] == "Hello there" and service.calls[0]["language"] == "en"
    assert os.path.exists(os.path.join(q.settings.output_dir, "jobs.sqlite3"))


def test_recording_and_avatar_inputs_reach_the_service_and_are_removed_afterwards(make_queue):
    service = SlowService()
    service.hold("<recording>")
    q = make_queue(service)
    job = q.submit(JobRequest(recording=b"RIFF-fake-audio", avatar_image=b"\xff\xd8fake-jpeg", language="en"))
    assert service.started("<recording>")
    assert sorted(os.listdir(job_dir(q, job.id))) == ["avatar.bin", "recording.bin"]
    service.release("<recording>")
    assert q.wait(job.id, timeout=5)["status"] == "done"
    call = service.calls[0]
    assert call["recording"] == b"RIFF-fake-audio" and call["avatar_image"] == b"\xff\xd8fake-jpeg"
    assert call["text"] is None
    assert os.listdir(job_dir(q, job.id)) == ["video.mp4"]


def test_queue_positions_follow_submission_order(make_queue):
    service = SlowService()
    service.hold("first")
    q = make_queue(service)
    first = q.submit(JobRequest(text="first", language="en"))
    assert service.started("first")
    others = [q.submit(JobRequest(text=f"job {i}", language="en")) for i in range(3)]
    assert [j.queue_position for j in others] == [1, 2, 3]
    assert [q.get(j.id)["queue_position"] for j in others] == [1, 2, 3]
    running = q.get(first.id)
    assert running["status"] == "running" and running["queue_position"] is None

    assert q.cancel(others[0].id)
    assert [q.get(j.id)["queue_position"] for j in others[1:]] == [1, 2]
    service.release("first")
    assert q.wait(others[2].id, timeout=5)["status"] == "done"
    assert [c["text"] for c in service.calls] == ["first", "job 1", "job 2"]
    assert q.get(others[1].id)["queue_position"] is None


def test_queue_full_is_refused_with_retry_after_until_a_slot_frees(make_queue):
    service = SlowService()
    service.hold("running")
    q = make_queue(service, job_queue_size=2)
    q.submit(JobRequest(text="running", language="en"))
    assert service.started("running")  # running jobs do not count as waiting
    waiting = [q.submit(JobRequest(text=f"wait {i}", language="en")) for i in range(2)]
    dirs_before = sorted(os.listdir(Path(q.settings.output_dir) / "jobs"))

    with pytest.raises(QueueFullError) as info:
        q.submit(JobRequest(text="one too many", language="en"))
    err = info.value
    assert err.status == 429 and err.code == "queue_full"
    assert isinstance(err.retry_after, int) and err.retry_after >= 1
    assert err.to_dict() == {"error": err.message, "code": "queue_full", "retry_after": err.retry_after}
    assert sorted(os.listdir(Path(q.settings.output_dir) / "jobs")) == dirs_before  # nothing left behind

    service.release("running")
    wait_for(lambda: q.get(waiting[0].id)["status"] != "queued")
    extra = q.submit(JobRequest(text="now it fits", language="en"))
    assert q.wait(extra.id, timeout=5)["status"] == "done"


def test_bad_requests_fail_at_submit_with_the_services_errors(make_queue):
    q = make_queue()
    cases = [
        (JobRequest(text="", language="en"), InvalidInputError, "empty_text", 400),
        (JobRequest(text="hi", language="xx"), InvalidInputError, "unsupported_language", 400),
        (JobRequest(text="x" * 201, language="en"), PayloadTooLargeError, "text_too_long", 413),
        (JobRequest(text=None), InvalidInputError, "missing_input", 400),
        (JobRequest(recording=b""), InvalidInputError, "invalid_audio", 400),
        (JobRequest(recording=b"x" * 10_001), PayloadTooLargeError, "upload_too_large", 413),
        (
            JobRequest(text="hi", language="en", avatar_image=b"x" * 10_001),
            PayloadTooLargeError,
            "upload_too_large",
            413,
        ),
        (
            JobRequest(text="hi", language="en", callback_url="ftp://example.com/x"),
            InvalidInputError,
            "invalid_callback_url",
            400,
        ),
        (
            JobRequest(text="hi", language="en", callback_url="/relative/path"),
            InvalidInputError,
            "invalid_callback_url",
            400,
        ),
    ]
    for request, kind, code, status in cases:
        with pytest.raises(kind) as info:
            q.submit(request)
        assert (info.value.code, info.value.status) == (code, status), request
    assert [d for d in os.listdir(Path(q.settings.output_dir) / "jobs") if not d.startswith(".")] == []
    assert q.service.calls == []


def test_unknown_and_path_like_ids_are_simply_unknown(make_queue, tmp_path):
    q = make_queue()
    done = q.submit(JobRequest(text="real", language="en"))
    assert q.wait(done.id, timeout=5)["status"] == "done"
    secret = tmp_path / "outputs" / "secret.txt"
    secret.write_text("keep me")
    bad_ids = [
        "../../etc/passwd",
        "../secret.txt",
        "",
        " ",
        done.id + "/../" + done.id,
        done.id.upper(),
        done.id + "\n",
        "0" * 31,
        "/" + done.id,
        "jobs.sqlite3",
        None,
        42,
        "0" * 32,
    ]
    for bad in bad_ids:
        assert q.get(bad) is None, bad
        assert q.result_path(bad) is None, bad
        assert list(q.events(bad, timeout=0.1)) == [], bad
        assert q.cancel(bad) is False, bad
    assert secret.read_text() == "keep me"
    assert q.result_path(done.id) is not None  # the real one is untouched


# ------------------------------------------------------------------- cancel
def test_cancel_queued_job_removes_it_and_its_files(make_queue):
    service = SlowService()
    service.hold("busy")
    q = make_queue(service)
    q.submit(JobRequest(text="busy", language="en"))
    assert service.started("busy")
    queued = q.submit(JobRequest(recording=b"some audio bytes"))
    assert job_dir(q, queued.id).is_dir()

    assert q.cancel(queued.id) is True
    state = q.get(queued.id)
    assert state["status"] == "cancelled" and state["queue_position"] is None and state["finished_at"]
    assert not job_dir(q, queued.id).exists()
    service.release("busy")
    nxt = q.submit(JobRequest(text="after", language="en"))
    assert q.wait(nxt.id, timeout=5)["status"] == "done"
    assert [c["text"] for c in service.calls] == ["busy", "after"]  # the cancelled one never ran


def test_cancel_running_job_aborts_the_render_and_the_worker_moves_on(make_queue):
    service = SlowService()
    service.hold("long")
    q = make_queue(service)
    running = q.submit(JobRequest(text="long", language="en"))
    nxt = q.submit(JobRequest(text="next", language="en"))
    assert service.started("long")
    wait_for(lambda: q.get(running.id)["stage"] == "lipsync")
    partial = job_dir(q, running.id) / "video.mp4.part"
    assert partial.exists()

    assert q.cancel(running.id) is True
    state = q.get(running.id)
    assert state["status"] == "cancelled" and state["finished_at"]
    assert service.aborted == ["long"]  # the render stopped; it was never released
    assert not job_dir(q, running.id).exists()  # partial output and folder gone
    assert q.result_path(running.id) is None
    assert q.wait(nxt.id, timeout=5)["status"] == "done"
    assert q.get(running.id)["status"] == "cancelled"  # the worker did not overwrite it


def test_cancel_of_an_ended_job_deletes_files_and_record(make_queue):
    q = make_queue()
    job = q.submit(JobRequest(text="finished", language="en"))
    assert q.wait(job.id, timeout=5)["status"] == "done"
    assert q.result_path(job.id)
    assert q.cancel(job.id) is True
    assert q.get(job.id) is None and q.result_path(job.id) is None
    assert not job_dir(q, job.id).exists()
    assert q.cancel(job.id) is False


# ------------------------------------------------------------------ failure
def test_failures_in_generate_end_the_job_failed_and_the_worker_continues(make_queue):
    service = SlowService()
    service.fail["no face here"] = NoFaceError("no face was found in the avatar image")
    service.fail["boom"] = RuntimeError("secret internal detail")
    q = make_queue(service)
    bad = q.submit(JobRequest(text="no face here", language="en"))
    crash = q.submit(JobRequest(text="boom", language="en"))
    good = q.submit(JobRequest(text="fine", language="en"))

    assert q.wait(good.id, timeout=5)["status"] == "done"
    failed = q.get(bad.id)
    assert failed["status"] == "failed" and failed["stage"] == "tts"
    assert failed["error"] == {"error": "no face was found in the avatar image", "code": "no_face"}
    crashed = q.get(crash.id)
    assert crashed["status"] == "failed" and crashed["error"]["code"] == "internal_error"
    assert "secret internal detail" not in json.dumps(crashed)
    for job in (bad, crash):
        assert q.result_path(job.id) is None and not job_dir(q, job.id).exists()


def test_jobs_wait_for_the_service_to_finish_loading(make_queue):
    class LoadingService(SlowService):
        status = "loading"

        def __init__(self):
            super().__init__()
            self.loaded = threading.Event()
            self.refusals = 0  # times the worker asked and was told "still loading"

        def wait_until_loaded(self, timeout=None):
            loaded = self.loaded.wait(timeout)
            self.refusals += not loaded
            return loaded

    service = LoadingService()
    q = make_queue(service)
    job = q.submit(JobRequest(text="early", language="en"))
    # the worker has looked twice since the submit (a whole round with the job waiting) and held back
    refusals = service.refusals
    wait_for(lambda: service.refusals >= refusals + 2, timeout=30)
    assert q.get(job.id)["status"] == "queued" and service.calls == []
    service.status = "ready"
    service.loaded.set()
    assert q.wait(job.id, timeout=5)["status"] == "done"


def test_submit_is_refused_when_the_service_failed_to_load(make_queue):
    service = SlowService()
    service.status = "error"
    q = make_queue(service)
    with pytest.raises(Exception) as info:
        q.submit(JobRequest(text="hi", language="en"))
    assert info.value.code == "not_ready" and info.value.status == 503


# ------------------------------------------------------------------- events
def test_events_from_another_thread_increase_and_end_with_the_final_state(make_queue):
    service = SlowService(steps=100, step_delay=0.004)  # ~200 progress reports in about 0.5 s
    q = make_queue(service)
    blocker = q.submit(JobRequest(text="before", language="en"))
    job = q.submit(JobRequest(text="watched", language="en"))
    got: list = []
    t = time.monotonic()
    listener = threading.Thread(target=lambda: got.extend(q.events(job.id, timeout=10)))
    listener.start()
    listener.join(10)
    assert not listener.is_alive()
    elapsed = time.monotonic() - t

    assert got[0]["status"] in ("queued", "running")  # the current state comes first
    assert got[-1]["status"] == "done" and got[-1]["progress"] == 1.0
    assert all(s["status"] != "done" for s in got[:-1])
    progress = [s["progress"] for s in got]
    assert progress == sorted(progress)
    assert len({s["progress"] for s in got if s["status"] == "running"}) >= 3
    # throttled: far fewer states than progress reports (~10 writes/s plus stage changes)
    assert service.progress_calls > 150
    # The throttle is a rate (one progress write per progress_interval = 0.1 s), so this bound is
    # the behaviour itself; it is measured on this run, so a slow machine only loosens it.
    assert len(got) <= 10 * elapsed + 12, (len(got), elapsed)
    assert q.get(blocker.id)["status"] == "done"
    # an ended job yields its final state once and stops
    assert [s["status"] for s in q.events(job.id, timeout=1)] == ["done"]


def test_events_with_timeout_end_early_and_heartbeat_yields_none(make_queue):
    service = SlowService()
    service.hold("slow")
    q = make_queue(service)
    job = q.submit(JobRequest(text="slow", language="en"))
    assert service.started("slow")
    wait_for(lambda: q.get(job.id)["stage"] == "lipsync")
    items: list = []
    took: list = []

    def listen():
        t = time.monotonic()
        items.extend(q.events(job.id, timeout=0.6, heartbeat=0.2))
        took.append(time.monotonic() - t)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    listener.join(30)  # the held job never ends by itself: only the timeout can end the events
    assert not listener.is_alive(), "events() did not end at its timeout"
    assert took[0] >= 0.5  # ...and not before it
    assert q.get(job.id)["status"] == "running"  # it ended early: the job still runs
    assert items[0]["status"] == "running"
    assert None in items  # heartbeats while nothing changes
    service.release("slow")


# ------------------------------------------------------------------ restart
CRASH_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from tests.test_jobs import SlowService, make_settings
from lipsync.jobs import JobRequest, LocalJobQueue
from pathlib import Path
service = SlowService()
service.hold("stuck")
q = LocalJobQueue(service, make_settings(Path(sys.argv[2])))
q.start()
done = q.submit(JobRequest(text="finished", language="en"))
assert q.wait(done.id, timeout=10)["status"] == "done"
running = q.submit(JobRequest(text="stuck", language="en"))
queued = q.submit(JobRequest(recording=b"queued audio"))
assert service.started("stuck")
while q.get(running.id)["stage"] != "lipsync":
    time.sleep(0.01)
print(json.dumps({"done": done.id, "running": running.id, "queued": queued.id}), flush=True)
time.sleep(60)
"""


def test_restart_after_a_crash_reports_unfinished_jobs_interrupted_and_serves_done_ones(make_queue, tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(REPO), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        ids = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)  # a crash: no stop(), no cleanup
        child.wait(10)
    q = make_queue()
    for key in ("running", "queued"):
        state = q.get(ids[key])
        assert state["status"] == "failed" and state["error"] == INTERRUPTED_ERROR, (key, state)
        assert state["finished_at"] and not job_dir(q, ids[key]).exists()
    assert q.get(ids["running"])["stage"] == "lipsync"  # where it was when the server died
    done = q.get(ids["done"])
    assert done["status"] == "done" and Path(q.result_path(ids["done"])).stat().st_size == 1000
    # and the restarted queue works
    job = q.submit(JobRequest(text="after restart", language="en"))
    assert q.wait(job.id, timeout=5)["status"] == "done"


def test_graceful_stop_interrupts_the_running_job_and_restart_fails_the_queued(make_queue, tmp_path):
    service = SlowService()
    service.hold("stuck")
    q1 = make_queue(service)
    finished = q1.submit(JobRequest(text="finished", language="en"))
    assert q1.wait(finished.id, timeout=5)["status"] == "done"
    running = q1.submit(JobRequest(text="stuck", language="en"))
    queued = q1.submit(JobRequest(text="queued", language="en"))
    assert service.started("stuck")
    wait_for(lambda: q1.get(running.id)["stage"] == "lipsync")
    threads = list(q1._threads)
    q1.stop(timeout=30)  # the held render never ends by itself: stop() must abort it, not time out
    assert not any(t.is_alive() for t in threads), "stop() returned at its timeout: the worker is still busy"
    assert service.aborted == ["stuck"]
    assert q1.get(running.id)["error"] == INTERRUPTED_ERROR

    q2 = make_queue(SlowService(), settings=q1.settings)
    assert q2.get(running.id)["status"] == "failed"
    assert q2.get(queued.id)["status"] == "failed" and q2.get(queued.id)["error"] == INTERRUPTED_ERROR
    assert q2.get(finished.id)["status"] == "done" and q2.result_path(finished.id)
    assert q2.service.calls == []  # the queued job was not run after the restart


def test_two_live_queues_share_one_folder_without_interrupting_each_other(make_queue):
    s1, s2 = SlowService(), SlowService()
    s1.hold("on q1")
    q1 = make_queue(s1)
    running = q1.submit(JobRequest(text="on q1", language="en"))
    assert s1.started("on q1")
    q2 = make_queue(s2, settings=q1.settings)  # e.g. a second gunicorn worker, a second GPU
    q2.cleanup()
    assert q2.get(running.id)["status"] == "running"
    other = q1.submit(JobRequest(text="taken by q2", language="en"))  # q1's worker is busy
    assert q2.wait(other.id, timeout=5)["status"] == "done"
    assert [c["text"] for c in s2.calls] == ["taken by q2"]
    assert q2.result_path(other.id)
    # cancel through the other process's queue reaches the render through the store
    assert q2.cancel(running.id)
    wait_for(lambda: s1.aborted == ["on q1"])
    wait_for(lambda: not job_dir(q1, running.id).exists())
    assert q1.get(running.id)["status"] == "cancelled"


# ------------------------------------------------------------------- expiry
def test_results_expire_after_the_ttl(make_queue):
    service = SlowService()
    service.fail["bad"] = NoFaceError("no face")
    q = make_queue(service, job_ttl_seconds=0.5, cleanup_interval=0.1)
    done = q.submit(JobRequest(text="short lived", language="en"))
    failed = q.submit(JobRequest(text="bad", language="en"))
    assert q.wait(done.id, timeout=5)["status"] == "done"
    assert q.wait(failed.id, timeout=5)["status"] == "failed"
    path = q.result_path(done.id)
    assert path and os.path.exists(path)
    # the cleanup drops the records, then the files: wait for both
    wait_for(
        lambda: q.get(done.id) is None and q.get(failed.id) is None and not job_dir(q, done.id).exists(), timeout=10
    )
    assert not os.path.exists(path) and not job_dir(q, done.id).exists()
    assert q.result_path(done.id) is None


def test_oldest_results_go_first_above_the_disk_cap(make_queue):
    service = SlowService(result_bytes=1000)
    q = make_queue(service, job_disk_cap_bytes=2500)  # room for two results; cleanup runs after each job
    ids = []
    for i in range(4):
        job = q.submit(JobRequest(text=f"result {i}", language="en"))
        assert q.wait(job.id, timeout=5)["status"] == "done"
        ids.append(job.id)
    # the cleanup drops the record, then the folder: wait for both
    wait_for(lambda: all(q.get(i) is None and not job_dir(q, i).exists() for i in ids[:2]))
    assert q.get(ids[0]) is None
    for gone in ids[:2]:
        assert not job_dir(q, gone).exists()
    for kept in ids[2:]:
        assert q.get(kept)["status"] == "done" and q.result_path(kept)


def test_cleanup_at_start_expires_old_results_and_orphans(make_queue):
    q1 = make_queue()
    job = q1.submit(JobRequest(text="old", language="en"))
    final = q1.wait(job.id, timeout=5)
    assert final["status"] == "done"
    finished_at = parse_iso(final["finished_at"]).timestamp()
    q1.stop()
    orphan = Path(q1.settings.output_dir) / "jobs" / ("ab" * 16)
    orphan.mkdir()
    (orphan / "video.mp4").write_bytes(b"x")
    keep = Path(q1.settings.output_dir) / "jobs" / "not-a-job"
    keep.mkdir()
    # until the result is older than q2's TTL (0.2 s) and the orphan than its grace (0.1 s); 10 ms margin
    # for the millisecond timestamps
    wait_for(lambda: time.time() - finished_at > 0.21 and time.time() - orphan.stat().st_mtime > 0.11)
    q2 = make_queue(settings=replace(q1.settings, job_ttl_seconds=0.2), cleanup_interval=3600, orphan_grace=0.1)
    assert q2.get(job.id) is None and not job_dir(q2, job.id).exists()
    assert not orphan.exists() and keep.exists()


# ------------------------------------------------------------ end to end
@pytest.mark.slow
def test_end_to_end_with_the_real_pipeline(tmp_path):
    from lipsync.service import LipsyncService

    settings = Settings(engine="builtin", output_dir=str(tmp_path / "outputs"), cache_dir=str(tmp_path / "cache"))
    service = LipsyncService(settings).load()
    # a pipeline that fails to load is a failure of this test, never a skip
    assert service.status == "ready", f"the real pipeline is not ready: {service.error}"
    q = LocalJobQueue(service, settings)
    q.start()
    try:
        with pytest.raises(InvalidInputError):
            q.submit(JobRequest(text="   ", language="en"))
        job = q.submit(JobRequest(text="Hello world.", language="en"))
        seen = list(q.events(job.id, timeout=120))
        final = seen[-1]
        assert final["status"] == "done", final
        progress = [s["progress"] for s in seen]
        assert progress == sorted(progress) and len(set(progress)) >= 3
        assert final["engine"] == "builtin" and final["frames"] > 0 and final["duration"] > 0
        from tests.media import probe

        info = probe(q.result_path(job.id))
        assert info["frames"] == final["frames"] and info["video_codec"] == "h264"

        # about 30 s of speech: long enough (a second or more) to cancel it mid-render
        cancelled = q.submit(JobRequest(text="This one is cancelled while it renders. " * 12, language="en"))
        wait_for(lambda: q.get(cancelled.id)["stage"] == "lipsync", timeout=60, interval=0.005)
        assert q.cancel(cancelled.id)
        state = q.get(cancelled.id)
        assert state is not None and state["status"] == "cancelled", state
        assert not job_dir(q, cancelled.id).exists()
        after = q.submit(JobRequest(text="Still working.", language="en"))
        assert q.wait(after.id, timeout=60)["status"] == "done"
        work = os.path.join(settings.output_dir, "tmp")
        assert not os.path.exists(work) or not os.listdir(work)  # the service's work files are gone too
        assert os.listdir(job_dir(q, after.id)) == ["video.mp4"]
    finally:
        q.stop()
