"""Cluster mode (README "Cluster"): a real redis-server, real nginx in front of two web processes
(gunicorn, QUEUE_URL), two real `python -m lipsync worker` processes (built-in engine), real
ffmpeg, one shared OUTPUT_DIR; all on loopback with free ports, started by the same
``lipsync.server.cluster.Cluster`` that ``make cluster`` uses.

Jobs spread over both workers; any web node answers, follows (SSE), streams and cancels any
job; SIGKILL of a worker mid-job, SIGTERM draining, a Redis restart, the Idempotency-Key, and
the same 4xx answers as the single-process service.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests

from lipsync.server.cluster import Cluster, free_port
from lipsync.server.settings import ServerSettings
from lipsync.settings import Settings
from tests.apps import unlimited_app
from tests.conftest import REPO, skip_or_fail, wait_until
from tests.media import probe

pytestmark = pytest.mark.slow

SECRET = "cluster-webhook-secret"
SHORT = {"text": "A short one.", "language": "en"}
# about 20 s of speech: several seconds of rendering, so a test can act while it runs
LONG = {"text": " ".join(f"Sentence number {i} keeps this worker busy for a little while." for i in range(6)),
        "language": "en"}


class _Receiver:
    """A webhook receiver on loopback: the body and headers of every POST."""

    def __init__(self):
        self.received: list[tuple[dict, bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for tool in ("redis-server", "nginx"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            skip_or_fail(f"{tool} is not installed (apt-get install {tool}; .ci/run does)")
    root = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update(OUTPUT_DIR=str(root / "shared"), CACHE_DIR=str(root / "cache"), ENGINE="builtin",
               RATE_LIMIT="off", RATE_LIMIT_READ="off", LOG_LEVEL="INFO", SHUTDOWN_GRACE_SECONDS="5",
               WORKER_HEARTBEAT_SECONDS="1", JOB_MAX_ATTEMPTS="2", WEBHOOK_SECRET=SECRET, PYTHONPATH=str(REPO),
               X264_THREADS="1")
    server = ServerSettings(host="127.0.0.1", port=free_port(), cluster_dir=str(root / "run"),
                            shutdown_grace_seconds=5)
    c = Cluster(server, Settings(), env)
    c.start(timeout=180)
    c.redis = redis.Redis.from_url(c.state["redis_url"])
    c.root = root
    try:
        yield c
    finally:
        c.stop(grace=30)


def _submit(base: str, body: dict, **headers) -> dict:
    r = requests.post(base + "/api/jobs", json=body, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()


def _state(base: str, job: dict) -> dict:
    return requests.get(base + job["status_url"], timeout=10).json()


def _wait_for(base: str, job: dict, condition, timeout: float = 120, message: str = "") -> dict:
    return wait_until(lambda: (lambda s: s if condition(s) else None)(_state(base, job)), timeout=timeout,
                      interval=0.05, message=message or f"job {job['id']} did not reach the state")


def _ended(base: str, job: dict, timeout: float = 120) -> dict:
    return _wait_for(base, job, lambda s: s["status"] in ("done", "failed", "cancelled"), timeout)


def _worker_of(cluster: Cluster, job: dict) -> str:
    """Which cluster process (worker-N) runs or ran ``job``: from its record and the worker's pid."""
    name = cluster.redis.hget(f"lipsync:job:{job['id']}", "worker").decode()
    pid = int(name.split(".")[-2])
    return next(n for n, p in cluster.state["pids"].items() if p == pid)


def _rendering(base: str, job: dict) -> dict:
    """Wait until the job is past its speech and being lip-synced."""
    return _wait_for(base, job, lambda s: s["status"] == "running" and s["stage"] in ("lipsync", "encode"),
                     message="the job never got to lip-syncing")


def _respawn(cluster: Cluster, *names: str) -> None:
    """Start killed or stopped workers again, and wait until both are listening."""
    for name in names:
        cluster.spawn(name)
    wait_until(lambda: _live_workers(cluster) == 2, timeout=60, interval=0.2, message=f"{names} did not come back")


def _live_workers(cluster: Cluster) -> int:
    """RQ workers registered in Redis whose process runs (a SIGKILLed one stays registered a while)."""
    pids = {pid for name, pid in cluster.state["pids"].items() if name.startswith("worker-") and cluster.alive(name)}
    return sum(1 for key in cluster.redis.smembers("rq:workers:lipsync")
               if int(cluster.redis.hget(key, "pid") or 0) in pids)


# ---------------------------------------------------------------- spreading, following, webhooks
def test_jobs_through_nginx_spread_over_both_workers_and_any_node_serves_them(cluster, tmp_path):
    receiver = _Receiver()
    try:
        jobs = [_submit(cluster.url, {**SHORT, "callback_url": receiver.url}) for _ in range(4)]
        finals = [_ended(cluster.url, job) for job in jobs]
        assert [s["status"] for s in finals] == ["done"] * 4
        assert {_worker_of(cluster, job) for job in jobs} == {"worker-1", "worker-2"}
        # webhooks as in the single-process mode: signed, the final state and the links
        wait_until(lambda: len(receiver.received) >= 4, timeout=30, message="webhooks not delivered")
        headers, body = receiver.received[0]
        expected = "sha256=" + hmac.new(SECRET.encode(), f"{headers['X-Signature-Timestamp']}.".encode() + body,
                                        hashlib.sha256).hexdigest()
        assert headers["X-Signature"] == expected
        payload = json.loads(body)
        assert payload["status"] == "done" and payload["status_url"] == f"/api/jobs/{payload['id']}"
    finally:
        receiver.close()

    # a long job submitted to one node is followed, streamed and fetched through the other
    web1, web2 = cluster.web_url("web-1"), cluster.web_url("web-2")
    job = _submit(web1, LONG)
    r = requests.get(web2 + job["stream_url"], stream=True, timeout=120)
    assert r.status_code == 200 and r.headers["Content-Type"] == "video/mp4"
    chunks, status_at_first_chunk = [], None
    for chunk in r.iter_content(64 * 1024):
        if status_at_first_chunk is None:
            status_at_first_chunk = _state(web1, job)["status"]
        chunks.append(chunk)
    assert status_at_first_chunk == "running", "the stream only started once the video was done"
    (tmp_path / "streamed.mp4").write_bytes(b"".join(chunks))
    events = requests.get(web2 + job["events_url"], stream=True, timeout=120)
    states = [json.loads(line[6:]) for line in events.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert states[-1]["status"] == "done"
    final = states[-1]
    assert probe(tmp_path / "streamed.mp4")["frames"] == final["frames"]
    whole = requests.get(web2 + job["video_url"], timeout=30)
    part = requests.get(web1 + job["video_url"], headers={"Range": "bytes=100-199"}, timeout=30)
    assert whole.status_code == 200 and part.status_code == 206 and part.content == whole.content[100:200]
    assert requests.delete(web2 + job["status_url"], timeout=10).status_code == 204
    assert requests.get(web1 + job["status_url"], timeout=10).status_code == 404


# ---------------------------------------------------------------- same answers as one process
def test_bad_input_gets_the_same_answers_as_the_single_process_service(cluster, tmp_path):
    too_long = {"text": "a" * (Settings().max_text_chars + 1), "language": "en"}
    cases = [
        ("post", "/api/jobs", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("post", "/api/jobs", {"json": {"text": "   ", "language": "en"}}),
        ("post", "/api/jobs", {"json": {"text": "Hi", "language": "xx"}}),
        ("post", "/api/jobs", {"json": {"text": "Hi", "language": "en", "callback_url": "file:///etc/passwd"}}),
        ("post", "/api/jobs", {"json": too_long}),
        ("post", "/api/jobs", {"json": SHORT, "headers": {"Idempotency-Key": "k" * 300}}),
        ("get", "/api/jobs/" + "0" * 32, {}),
        ("get", "/api/jobs/..%2F..%2Fetc%2Fpasswd/video", {}),
        ("delete", "/api/jobs/" + "f" * 32, {}),
        ("get", "/api/jobs/" + "0" * 32 + "/stream", {}),
    ]
    with unlimited_app(tmp_path) as app:
        client = app.test_client()
        for method, path, kwargs in cases:
            local = getattr(client, method)(path, **kwargs)
            remote = getattr(requests, method)(cluster.url + path, timeout=30, **kwargs)
            assert (remote.status_code, remote.json()) == (local.status_code, local.get_json()), (method, path)
            assert remote.json()["code"], (method, path)


# ---------------------------------------------------------------- idempotency
def test_an_idempotency_key_retried_on_another_node_returns_the_same_job(cluster):
    key = {"Idempotency-Key": "invoice-2026-0042"}
    first = _submit(cluster.web_url("web-1"), SHORT, **key)
    retry = _submit(cluster.web_url("web-2"), SHORT, **key)
    assert retry["id"] == first["id"]
    other = requests.post(cluster.url + "/api/jobs", json={**SHORT, "text": "Something else."}, headers=key,
                          timeout=10)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert _ended(cluster.url, first)["status"] == "done"
    assert _submit(cluster.url, SHORT, **key)["id"] == first["id"]  # also once it is done


# ---------------------------------------------------------------- cancel
def test_cancel_through_the_other_node_reaches_the_worker_within_a_second(cluster):
    job = _submit(cluster.web_url("web-1"), LONG)
    _rendering(cluster.url, job)
    worker_name = cluster.redis.hget(f"lipsync:job:{job['id']}", "worker").decode()
    worker_key = f"rq:worker:{worker_name}"
    started = time.monotonic()
    r = requests.delete(cluster.web_url("web-2") + job["status_url"], timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    wait_until(lambda: cluster.redis.hget(worker_key, "state") == b"idle", timeout=10, interval=0.01,
               message="the worker kept rendering the cancelled job")
    elapsed = time.monotonic() - started
    print(f"[cluster] cancel -> worker idle in {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    assert os.listdir(os.path.join(cluster.root, "shared", "jobs", job["id"])) == ["job.json"]
    assert _state(cluster.url, job)["status"] == "cancelled"


# ---------------------------------------------------------------- dead and stopping workers
def test_a_worker_killed_mid_job_hands_the_job_to_the_other(cluster, tmp_path):
    job = _submit(cluster.url, LONG)
    _rendering(cluster.url, job)
    victim = _worker_of(cluster, job)
    cluster.kill(victim, signal.SIGKILL)
    final = _ended(cluster.url, job, timeout=180)
    assert final["status"] == "done", final
    assert _worker_of(cluster, job) != victim
    assert cluster.redis.hget(f"lipsync:job:{job['id']}", "attempt") == b"2"
    (tmp_path / "v.mp4").write_bytes(requests.get(cluster.url + job["video_url"], timeout=30).content)
    assert probe(tmp_path / "v.mp4")["frames"] == final["frames"]
    _respawn(cluster, victim)


def test_a_job_whose_workers_keep_dying_fails_with_worker_lost(cluster):
    job = _submit(cluster.url, LONG)
    _rendering(cluster.url, job)
    first = _worker_of(cluster, job)
    cluster.kill(first, signal.SIGKILL)
    _wait_for(cluster.url, job, lambda s: s["status"] == "running" and cluster.redis.hget(
        f"lipsync:job:{job['id']}", "attempt") == b"2", message="the job was not taken up again")
    second = _worker_of(cluster, job)
    assert second != first
    cluster.kill(second, signal.SIGKILL)
    final = _ended(cluster.url, job, timeout=60)
    assert final["status"] == "failed" and final["error"]["code"] == "worker_lost", final
    _respawn(cluster, first, second)


def test_sigterm_lets_the_worker_finish_its_job_then_it_exits(cluster):
    job = _submit(cluster.url, LONG)
    _rendering(cluster.url, job)
    name = _worker_of(cluster, job)
    cluster.kill(name, signal.SIGTERM)
    after = _submit(cluster.url, SHORT)
    assert _ended(cluster.url, job)["status"] == "done"
    assert _worker_of(cluster, job) == name  # finished where it ran, not handed over
    wait_until(lambda: not cluster.alive(name), timeout=30, message=f"{name} did not exit after its job")
    assert cluster.procs[name].returncode == 0
    assert _ended(cluster.url, after)["status"] == "done" and _worker_of(cluster, after) != name
    _respawn(cluster, name)


# ---------------------------------------------------------------- redis restart
def test_a_redis_restart_loses_no_finished_video(cluster):
    job = _submit(cluster.url, SHORT)
    assert _ended(cluster.url, job)["status"] == "done"
    video = requests.get(cluster.url + job["video_url"], timeout=30).content
    cluster.kill("redis", signal.SIGTERM)  # redis-server writes its append-only file and exits
    wait_until(lambda: not cluster.alive("redis"), timeout=30, message="redis-server did not stop")
    cluster.spawn("redis")
    wait_until(lambda: _ping(cluster), timeout=30, message="redis-server did not come back")
    assert requests.get(cluster.url + job["video_url"], timeout=30).content == video
    after = _submit(cluster.url, SHORT)  # workers and web nodes reconnected
    assert _ended(cluster.url, after, timeout=120)["status"] == "done"
    # even a Redis that lost everything: the finished job is served from the shared folder
    cluster.redis.flushall()
    state = _state(cluster.url, job)
    assert state["status"] == "done" and state["frames"] > 0
    assert requests.get(cluster.url + job["video_url"], timeout=30).content == video


def _ping(cluster: Cluster) -> bool:
    try:
        return bool(cluster.redis.ping())
    except redis.RedisError:
        return False
