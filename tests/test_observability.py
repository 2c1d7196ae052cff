"""Operations: request ids, one JSON log line per request and per job (never the text), and the
Prometheus metrics at /metrics, through the real app and pipeline."""

from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lipsync.engines.builtin.engine import VERSION as BUILTIN_VERSION
from lipsync.server import close_app, create_app
from lipsync.server.observability import JsonFormatter, configure_logging, sane_request_id
from lipsync.settings import Settings
from tests.apps import make_app
from tests.conftest import wait_until

SECRET_TEXT = "Zebra quartz phrase 4711, do not log me."


class _Capture(logging.Handler):
    """Every record of the lipsync loggers, rendered by the JSON formatter."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))

    def records(self, **match) -> list[dict]:
        out = []
        for line in self.lines:
            data = json.loads(line)  # every line is one JSON object
            if all(data.get(k) == v for k, v in match.items()):
                out.append(data)
        return out


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("observability")
    settings = Settings(output_dir=str(root / "o"), cache_dir=str(root / "c"), engine="builtin")
    app = create_app({"SETTINGS": settings, "LOAD_IN_BACKGROUND": False})
    yield app
    close_app(app)


@pytest.fixture
def logs():
    handler = _Capture()
    logger = logging.getLogger("lipsync")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _call(client, method: str, path: str, **kw):
    """A request whose response is closed (the access line is written when the body is done)."""
    with getattr(client, method)(path, **kw) as r:
        r.get_data()
        return r


def _metrics(client) -> dict:
    text = _call(client, "get", "/metrics").get_data(as_text=True)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------- request id
def test_request_id_is_generated_kept_when_sane_and_replaced_when_not(app):
    client = app.test_client()
    generated = _call(client, "get", "/api/health").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert _call(client, "get", "/api/health").headers["X-Request-ID"] != generated
    mine = "client-7f3a.trace:42"
    assert _call(client, "get", "/api/health", headers={"X-Request-ID": mine}).headers["X-Request-ID"] == mine
    for bad in ("x" * 200, "has space", "semi;colon", "<script>", "ünïcode", "-leading-dash"):
        got = _call(client, "get", "/api/health", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert got != bad and sane_request_id(got) == got
    # errors and unknown paths carry it too
    assert _call(client, "get", "/api/nope").headers["X-Request-ID"]
    assert _call(client, "post", "/api/generate", data=b"{").headers["X-Request-ID"]


# --------------------------------------------------------------------- logs
def test_one_json_line_per_request_without_the_text(app, logs):
    client = app.test_client()
    rid = "obs-test-1"
    r = _call(client, "post", "/api/generate?api_key=should-not-appear", json={"text": SECRET_TEXT, "language": "en"},
              headers={"X-Request-ID": rid, "User-Agent": "obs-test/1"})
    assert r.status_code == 200
    lines = logs.records(event="request", request_id=rid)
    assert len(lines) == 1
    line = lines[0]
    assert line["logger"] == "lipsync.access" and line["level"] == "INFO"
    assert line["method"] == "POST" and line["path"] == "/api/generate" and line["route"] == "/api/generate"
    assert line["status"] == 200 and line["bytes"] == len(r.data) and line["duration_ms"] > 0
    assert line["client"] == "127.0.0.1" and line["user_agent"] == "obs-test/1" and line["request_bytes"] > 0
    everything = "\n".join(logs.lines)
    assert SECRET_TEXT not in everything and "Zebra" not in everything
    assert "should-not-appear" not in everything  # query strings are not logged

    r = _call(client, "post", "/api/generate", json={"text": 5}, headers={"X-Request-ID": "obs-test-2"})
    line = logs.records(event="request", request_id="obs-test-2")[0]
    assert line["status"] == 400 and line["error_code"] == "invalid_text"


def test_log_text_puts_the_text_in_the_request_line_only_when_asked(tmp_path, logs):
    app = make_app(output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), engine="builtin", log_text=True)
    try:
        _call(app.test_client(), "post", "/api/generate", json={"text": SECRET_TEXT, "language": "en"},
              headers={"X-Request-ID": "obs-text"})
        assert logs.records(event="request", request_id="obs-text")[0]["text"] == SECRET_TEXT
    finally:
        close_app(app)


def test_one_json_line_per_job_with_timings_and_no_text(app, logs):
    client = app.test_client()
    r = _call(client, "post", "/api/jobs", json={"text": SECRET_TEXT, "language": "en"},
              headers={"X-Request-ID": "obs-job"})
    job_id = r.get_json()["id"]
    assert logs.records(event="request", request_id="obs-job")[0]["job_id"] == job_id
    wait_until(lambda: logs.records(event="job", job_id=job_id), timeout=60, interval=0.05)
    (line,) = logs.records(event="job", job_id=job_id)
    assert line["status"] == "done" and line["engine"] == "builtin" and line["duration_ms"] > 0
    assert line["video_seconds"] > 0 and line["frames"] > 0
    assert {"tts", "lipsync", "encode", "total", "queue_wait"} <= set(line["timings"])
    assert SECRET_TEXT not in "\n".join(logs.lines)


def test_configure_logging_writes_json_lines(tmp_path):
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        configure_logging("INFO", "json", stream=stream)
        configure_logging("INFO", "json", stream=stream)  # idempotent: one handler
        logging.getLogger("lipsync.test").info("hello %s", "there", extra={"job_id": "abc"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("lipsync.test").exception("failed")
    finally:
        for h in list(root.handlers):
            if h not in before[0]:
                root.removeHandler(h)
        root.setLevel(before[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["msg"] == "hello there" and lines[0]["job_id"] == "abc" and lines[0]["level"] == "INFO"
    assert lines[0]["ts"].endswith("Z")
    assert "ValueError: boom" in lines[1]["exc"]


# ------------------------------------------------------------------ metrics
def test_metrics_count_requests_stages_jobs_and_describe_the_engine(app):
    client = app.test_client()
    before = _metrics(client)
    assert _call(client, "post", "/api/generate", json={"text": "Metrics please.", "language": "en"}).status_code == 200
    _call(client, "get", "/api/jobs/" + "f" * 32)
    job_id = _call(client, "post", "/api/jobs", json={"text": "A job too.", "language": "en"}).get_json()["id"]
    wait_until(lambda: _call(client, "get", f"/api/jobs/{job_id}").get_json()["status"] == "done",
               timeout=60, interval=0.05)
    job_metrics = [("lipsync_jobs_finished_total", {"status": "done", "code": ""})] + [
        ("lipsync_stage_duration_seconds_count", {"stage": stage, "source": "job"})
        for stage in ("tts", "lipsync", "composite", "encode", "total", "queue_wait")]

    def job_reported():
        """The worker reports the finished job (its metrics) just after marking it done."""
        samples = _metrics(client)
        if all(_value(samples, name, **labels) > _value(before, name, **labels) for name, labels in job_metrics):
            return samples
        return None

    after = wait_until(job_reported, timeout=30, interval=0.05)

    def grew(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("lipsync_http_requests_total", method="POST", route="/api/generate", status="200") == 1
    assert grew("lipsync_http_requests_total", method="GET", route="/api/jobs/<job_id>", status="404") == 1
    assert grew("lipsync_http_requests_total", method="POST", route="/api/jobs", status="202") == 1
    for stage in ("tts", "lipsync", "composite", "encode", "total"):
        assert grew("lipsync_stage_duration_seconds_count", stage=stage, source="sync") == 1, stage
        assert grew("lipsync_stage_duration_seconds_count", stage=stage, source="job") == 1, stage
    assert grew("lipsync_stage_duration_seconds_count", stage="queue_wait", source="job") == 1
    assert grew("lipsync_http_request_duration_seconds_count", method="POST", route="/api/generate") == 1
    assert grew("lipsync_jobs_finished_total", status="done", code="") == 1
    assert _value(after, "lipsync_jobs", status="done") >= 1
    assert _value(after, "lipsync_queue_depth") == 0
    assert _value(after, "lipsync_ready") == 1
    assert _value(after, "lipsync_engine_info", engine="builtin", device="cpu", version=BUILTIN_VERSION, checkpoint="",
                  tts_provider="espeak", face_detector="haar") == 1
    assert _value(after, "process_resident_memory_bytes") > 0
    assert _value(after, "lipsync_shutting_down") == 0


def test_queue_depth_counts_waiting_jobs(tmp_path):
    settings = Settings(output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), engine="builtin")
    app = create_app({"SETTINGS": settings, "LOAD_IN_BACKGROUND": False})
    jobs = app.extensions["jobs"]
    try:
        jobs.drain(0)  # the worker takes nothing: submitted jobs wait
        client = app.test_client()
        for _ in range(3):
            assert _call(client, "post", "/api/jobs", json={"text": "Wait.", "language": "en"}).status_code == 202
        samples = _metrics(client)
        assert _value(samples, "lipsync_queue_depth") == 3 and _value(samples, "lipsync_jobs", status="queued") == 3
    finally:
        jobs.stop()
