"""A bounded load test on loopback: 8 concurrent clients for 30 s against `python app.py`.

Half the clients use the synchronous API (POST /api/generate), half the jobs API (submit, poll,
download). Each client has its own API key, so each has its own rate-limit bucket
(RATE_LIMIT=40/minute), low enough that the busiest clients meet it: 429 is part of what is
checked. Every request must end in success or a documented refusal (429 rate_limited/queue_full,
503 busy); afterwards the server's memory (RSS) is back near its baseline, no temporary file
remains, and its thread count is back near its baseline (nothing stuck).

30 s instead of 60: on 2 cores a short text takes ~0.15 s, so 30 s already means several
hundred renders and a few hundred rate-limited answers, and memory/thread leaks show up per
request, not per minute; the whole hardening set has to fit in about four minutes.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
import requests

from tests.conftest import wait_until
from tests.test_faults import child_pids, leftovers, live, proc_status, shared_cache  # noqa: F401 (fixtures)

CLIENTS = 8
DURATION = 30.0
KEYS = [f"load-test-key-{i:02d}-0123456789abcdef" for i in range(CLIENTS)]
TEXTS = ["Hello!", "Привет! Как дела?", "Сәлеметсіз бе!", "Short and sweet.", "One more, please."]
DOCUMENTED = {(429, "rate_limited"), (429, "queue_full"), (503, "busy")}
# Memory: back near the baseline. The bound is what a leak of per-request resources exceeds:
# an SQLite connection per request thread was ~120 KB (+100 MiB over this test), a frame
# batch or a video is 0.1-1 MB. What stays is the allocator's plateau after the first renders
# in each thread, which depends on how the threads interleave: measured in one process with 4
# render threads, +16.1 MiB after 48 renders, +16.6 after 120, +14.3 after 320 (idle motion
# on; +17.1 off), i.e. no growth per request; through this test +45-65 MiB.
RSS_GROWTH_KIB = 80 * 1024


@pytest.mark.slow
def test_eight_clients_for_thirty_seconds_nothing_lost(live, capsys):
    server = live({"API_KEYS": ",".join(KEYS), "RATE_LIMIT": "20/minute", "RATE_LIMIT_READ": "6000/minute",
                   "MAX_SYNC_RENDERS": "2", "SYNC_WAIT_SECONDS": "5", "JOB_QUEUE_SIZE": "8"})
    pid = server.server_pid

    def session(key: str) -> requests.Session:
        http = requests.Session()
        http.trust_env = False
        http.headers["Authorization"] = f"Bearer {key}"
        return http

    # Warm up (first renders allocate the encoder, TTS voice, caches), then take the baseline.
    warm = session(KEYS[0])
    for text in TEXTS[:3]:
        assert warm.post(server.url("/api/generate"), json={"text": text, "language": "auto"}, timeout=60).ok
    job = warm.post(server.url("/api/jobs"), json={"text": "Warm up.", "language": "en"}, timeout=60).json()
    server.wait_job(job["id"], headers={"Authorization": f"Bearer {KEYS[0]}"})
    warm.close()
    baseline = _idle_status(pid)  # once the warm-up's connection thread and encoders are gone

    outcomes: collections.Counter = collections.Counter()
    unexpected: list[str] = []
    lock = threading.Lock()
    peak = {"rss": baseline["VmRSS"], "threads": baseline["Threads"]}
    stop = threading.Event()
    deadline = time.monotonic() + DURATION

    def record(kind: str, r: requests.Response) -> None:
        code = None
        if r.headers.get("Content-Type", "").startswith("application/json") and r.status_code >= 400:
            code = r.json().get("code")
        with lock:
            outcomes[(kind, r.status_code, code)] += 1
            if r.status_code >= 400 and (r.status_code, code) not in DOCUMENTED:
                unexpected.append(f"{kind}: {r.status_code} {r.text[:200]}")
            if r.status_code in (429, 503) and not r.headers.get("Retry-After"):
                unexpected.append(f"{kind}: {r.status_code} without Retry-After")

    def pause_after(r: requests.Response) -> None:
        if r.status_code in (429, 503):  # a polite client: back off (capped, the test is bounded)
            time.sleep(min(1.0, float(r.headers.get("Retry-After", 1))))

    def sync_client(i: int) -> None:
        http = session(KEYS[i])
        n = 0
        while time.monotonic() < deadline:
            text = TEXTS[n % len(TEXTS)]
            n += 1
            try:
                r = http.post(server.url("/api/generate"), json={"text": text, "language": "auto"}, timeout=60)
            except requests.RequestException as exc:
                with lock:
                    unexpected.append(f"sync: {type(exc).__name__}: {exc}")
                continue
            if r.ok and (r.headers["Content-Type"] != "video/mp4" or len(r.content) < 1000):
                with lock:
                    unexpected.append("sync: 200 without a video")
            record("generate", r)
            pause_after(r)
        http.close()

    def job_client(i: int) -> None:
        http = session(KEYS[i])
        n = 0
        while time.monotonic() < deadline:
            text = TEXTS[n % len(TEXTS)]
            n += 1
            try:
                r = http.post(server.url("/api/jobs"), json={"text": text, "language": "auto"}, timeout=60)
                record("submit", r)
                if r.status_code != 202:
                    pause_after(r)
                    continue
                job_id = r.json()["id"]
                while True:
                    state = http.get(server.url(f"/api/jobs/{job_id}"), timeout=30)
                    record("status", state)
                    if state.ok and state.json()["status"] in ("done", "failed", "cancelled"):
                        break
                    time.sleep(0.1)
                if state.json()["status"] != "done":
                    with lock:
                        unexpected.append(f"job {job_id} ended {state.json()}")
                    continue
                video = http.get(server.url(f"/api/jobs/{job_id}/video"), timeout=30)
                record("video", video)
                if not video.ok or len(video.content) < 1000:
                    with lock:
                        unexpected.append(f"job {job_id}: no video")
            except requests.RequestException as exc:
                with lock:
                    unexpected.append(f"jobs: {type(exc).__name__}: {exc}")
        http.close()

    def sampler() -> None:
        while not stop.is_set():
            try:
                now = proc_status(pid)
            except OSError:
                return
            peak["rss"] = max(peak["rss"], now["VmRSS"])
            peak["threads"] = max(peak["threads"], now["Threads"])
            time.sleep(0.1)

    threads = [threading.Thread(target=sync_client if i % 2 == 0 else job_client, args=(i,)) for i in range(CLIENTS)]
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(DURATION + 120)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a client is stuck"

    # Settle: queued jobs finish, idle connections close, the allocator gives memory back. Wait
    # (up to a generous deadline) for the state asserted below; if it never comes, the assertions
    # below say what did not settle.
    def settled():
        now = proc_status(pid)
        back = (now["Threads"] <= baseline["Threads"] + 2 and now["VmRSS"] - baseline["VmRSS"] < RSS_GROWTH_KIB
                and not child_pids(pid) and not leftovers(server.output_dir, _done_jobs(server)))
        return now if back else None

    try:
        after = wait_until(settled, timeout=60, interval=0.5)
    except AssertionError:
        after = proc_status(pid)
    stop.set()
    ffmpeg_left = [p for p in child_pids(pid)]

    total = sum(outcomes.values())
    ok = sum(n for (kind, status, code), n in outcomes.items() if status < 400)
    refused_429 = sum(n for (kind, status, code), n in outcomes.items() if status == 429)
    refused_503 = sum(n for (kind, status, code), n in outcomes.items() if status == 503)
    renders = sum(n for (kind, status, code), n in outcomes.items() if kind in ("generate", "video") and status == 200)
    with capsys.disabled():
        print(f"\n[load] {CLIENTS} clients x {elapsed:.0f} s: {total} requests, {ok} ok "
              f"({renders} videos), {refused_429} x 429, {refused_503} x 503, {len(unexpected)} unexpected")
        for (kind, status, code), n in sorted(outcomes.items(), key=lambda kv: str(kv[0])):
            print(f"[load]   {kind:8s} {status} {code or '':14s} {n}")
        print(f"[load] RSS KiB baseline {baseline['VmRSS']}, peak {peak['rss']}, after {after['VmRSS']} "
              f"(+{(after['VmRSS'] - baseline['VmRSS']) / 1024:.1f} MiB); threads baseline {baseline['Threads']}, "
              f"peak {peak['threads']}, after {after['Threads']}; child processes after: {len(ffmpeg_left)}")

    assert not unexpected, unexpected[:10]
    assert renders >= 50, "the load test did almost no work"
    assert refused_429 > 0, "the rate limit never triggered: the test did not reach it"
    assert server.get("/api/health").status_code == 200
    assert leftovers(server.output_dir, _done_jobs(server)) == []
    assert ffmpeg_left == []
    assert after["Threads"] <= baseline["Threads"] + 2, "threads are stuck"
    assert after["VmRSS"] - baseline["VmRSS"] < RSS_GROWTH_KIB, f"RSS grew {after['VmRSS'] - baseline['VmRSS']} KiB"


def _idle_status(pid: int, steady: float = 0.5) -> dict:
    """The server's /proc status once it is idle: no child process (encoder) and the same thread
    count for ``steady`` s (the connection threads of finished requests have exited)."""
    seen = {"threads": None, "since": 0.0}

    def idle():
        now = proc_status(pid)
        if child_pids(pid) or now["Threads"] != seen["threads"]:
            seen.update(threads=now["Threads"], since=time.monotonic())
            return None
        return now if time.monotonic() - seen["since"] >= steady else None

    return wait_until(idle, timeout=30, interval=0.1, message="the server to be idle after the warm-up")


def _done_jobs(server) -> set[str]:
    jobs = server.output_dir / "jobs"
    return {p.name for p in jobs.iterdir() if (p / "video.mp4").exists()} if jobs.exists() else set()
