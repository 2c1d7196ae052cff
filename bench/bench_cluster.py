"""Cluster benchmark: throughput with 1 vs 2 workers, and submit-to-start latency Redis vs embedded.

    .venv/bin/python bench/bench_cluster.py [--jobs 8] [--sentences 3] [--latency-runs 10]

Starts real clusters (``lipsync.server.cluster.Cluster``: redis-server, nginx, one web node,
N ``python -m lipsync worker`` processes, built-in engine) on free loopback ports in a temporary
folder, submits ``--jobs`` jobs at once through nginx and waits for all of them: jobs per minute
and the real-time factor (seconds of video made per second of wall time). Then the latency of one
job on an idle queue from its submission to its start (the job's ``queue_wait`` timing: created
by the web node, claimed by the worker), for the cluster and for the embedded SQLite queue.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests  # noqa: E402

from lipsync.server import close_app, create_app  # noqa: E402
from lipsync.server.cluster import Cluster, free_port  # noqa: E402
from lipsync.server.settings import ServerSettings  # noqa: E402
from lipsync.settings import Settings  # noqa: E402

TEXT = "This is sentence number {i} of the cluster benchmark, spoken by the avatar."
SHORT = {"text": "Start now.", "language": "en"}


def _wait_done(base: str, ids: list[str], timeout: float = 900) -> list[dict]:
    deadline = time.monotonic() + timeout
    finals: dict[str, dict] = {}
    while len(finals) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError("jobs did not finish in time")
        for job_id in ids:
            if job_id not in finals:
                state = requests.get(f"{base}/api/jobs/{job_id}", timeout=10).json()
                if state["status"] in ("done", "failed", "cancelled"):
                    finals[job_id] = state
        time.sleep(0.05)
    return [finals[i] for i in ids]


def throughput(root: str, workers: int, jobs: int, sentences: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update(OUTPUT_DIR=os.path.join(root, f"shared-{workers}"), CACHE_DIR=os.path.join(root, "cache"),
               ENGINE="builtin", RATE_LIMIT="off", RATE_LIMIT_READ="off", LOG_LEVEL="WARNING",
               JOB_QUEUE_SIZE=str(jobs + 4), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    server = ServerSettings(host="127.0.0.1", port=free_port(), cluster_dir=os.path.join(root, f"run-{workers}"),
                            cluster_web_nodes=1, cluster_workers=workers)
    cluster = Cluster(server, Settings(), env)
    cluster.start(timeout=180)
    try:
        text = " ".join(TEXT.format(i=i) for i in range(sentences))
        # warm-up: one job per worker (first renders pay for lazy imports)
        _wait_done(cluster.url, [requests.post(cluster.url + "/api/jobs", json={"text": "Warm up.", "language": "en"},
                                               timeout=30).json()["id"] for _ in range(workers)])
        started = time.monotonic()
        ids = [requests.post(cluster.url + "/api/jobs", json={"text": text, "language": "en"}, timeout=30).json()["id"]
               for _ in range(jobs)]
        finals = _wait_done(cluster.url, ids)
        wall = time.monotonic() - started
        assert all(s["status"] == "done" for s in finals), finals
        video = sum(s["duration"] for s in finals)
        latency = []
        for _ in range(args.latency_runs):
            job = requests.post(cluster.url + "/api/jobs", json=SHORT, timeout=30).json()
            latency.append(_wait_done(cluster.url, [job["id"]])[0]["timings"]["queue_wait"])
        return {"workers": workers, "jobs": jobs, "wall_s": wall, "jobs_per_min": jobs / wall * 60,
                "rtf": video / wall, "video_s": video, "queue_wait_ms": latency}
    finally:
        cluster.stop(grace=60)


def embedded_latency(root: str, runs: int) -> list[float]:
    settings = Settings(output_dir=os.path.join(root, "embedded"), cache_dir=os.path.join(root, "cache"),
                        engine="builtin")
    app = create_app({"SETTINGS": settings, "SERVER": ServerSettings(rate_limit="off", rate_limit_read="off"),
                      "LOAD_IN_BACKGROUND": False})
    client = app.test_client()
    try:
        client.post("/api/jobs", json={"text": "Warm up.", "language": "en"})
        waits = []
        for _ in range(runs + 1):
            job = client.post("/api/jobs", json=SHORT).get_json()
            while (state := client.get(job["status_url"]).get_json())["status"] not in ("done", "failed"):
                time.sleep(0.05)
            waits.append(state["timings"]["queue_wait"])
        return waits[1:]  # the first may wait for the warm-up job
    finally:
        close_app(app)


def main() -> None:
    print(f"machine: {platform.node()}, {os.cpu_count()} CPU cores, {platform.platform()}, "
          f"python {platform.python_version()}; built-in engine")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as root:
        results = [throughput(root, workers, args.jobs, args.sentences) for workers in (1, 2)]
        embedded = embedded_latency(root, args.latency_runs)
    print(f"\nthroughput: {args.jobs} jobs of {args.sentences} sentences submitted at once through nginx")
    print(f"{'workers':>8} {'wall s':>8} {'jobs/min':>9} {'video s':>8} {'RTF':>6}")
    for r in results:
        print(f"{r['workers']:>8} {r['wall_s']:>8.1f} {r['jobs_per_min']:>9.1f} {r['video_s']:>8.1f} {r['rtf']:>6.2f}")
    print(f"speed-up 2 vs 1 worker: {results[1]['jobs_per_min'] / results[0]['jobs_per_min']:.2f}x")
    print(f"\nsubmit-to-start (queue_wait of one job on an idle queue, {args.latency_runs} runs, ms)")
    for name, waits in (("redis/RQ (1 worker)", results[0]["queue_wait_ms"]),
                        ("redis/RQ (2 workers)", results[1]["queue_wait_ms"]), ("embedded SQLite", embedded)):
        print(f"{name:>22}: median {statistics.median(waits):6.1f}, max {max(waits):6.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=10)
    args = parser.parse_args()
    main()
