"""The jobs API over HTTP: submit, follow (SSE), stream, fetch with Range, cancel."""

from __future__ import annotations

import json

import pytest

from lipsync.server import close_app, create_app
from lipsync.settings import Settings
from tests.conftest import wait_until
from tests.media import probe

LONG_TEXT = " ".join(f"This is sentence number {i}, spoken while the next one is being prepared." for i in range(12))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-api")
    settings = Settings(output_dir=str(root / "outputs"), cache_dir=str(root / "cache"), engine="builtin",
                        job_queue_size=2)
    app = create_app({"SETTINGS": settings, "LOAD_IN_BACKGROUND": False})
    yield app
    close_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


def _events(client, url: str) -> list[dict]:
    """Read a Server-Sent Events stream to its end; the JSON of every data line."""
    r = client.get(url, buffered=False)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    states = []
    for chunk in r.response:
        for line in chunk.decode().splitlines():
            if line.startswith("data: "):
                states.append(json.loads(line[6:]))
    r.close()
    return states


def _wait(client, job_id: str, statuses=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    last: dict = {}

    def reached():
        last.update(client.get(f"/api/jobs/{job_id}").get_json())
        return dict(last) if last["status"] in statuses else None

    try:
        return wait_until(reached, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"job {job_id} still {last.get('status')} after {timeout} s") from None


@pytest.mark.slow
def test_a_job_runs_with_live_progress_and_serves_its_video_with_range(client, tmp_path):
    r = client.post("/api/jobs", json={"text": "Привет! Это асинхронное задание.", "language": "ru"})
    assert r.status_code == 202
    job = r.get_json()
    assert job["status"] in ("queued", "running") and len(job["id"]) >= 32
    assert r.headers["Location"] == job["status_url"] == f"/api/jobs/{job['id']}"
    states = _events(client, job["events_url"])
    assert states[-1]["status"] == "done"
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert {"tts", "lipsync", "encode"} <= {s["stage"] for s in states}

    whole = client.get(job["video_url"])
    assert whole.status_code == 200 and whole.mimetype == "video/mp4"
    (tmp_path / "v.mp4").write_bytes(whole.data)
    info = probe(tmp_path / "v.mp4")
    assert info["frames"] == states[-1]["frames"]
    assert abs(info["video_duration"] - info["audio_duration"]) <= 0.04 + 0.03  # one frame (+ AAC priming)

    part = client.get(job["video_url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.data == whole.data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(whole.data)}"


@pytest.mark.slow
def test_long_text_streams_before_the_job_is_done_and_joins_seamlessly(client, tmp_path):
    job = client.post("/api/jobs", json={"text": LONG_TEXT, "language": "en"}).get_json()
    r = client.get(job["stream_url"], buffered=False)
    assert r.status_code == 200 and r.mimetype == "video/mp4"
    chunks, status_at_first_chunk = [], None
    for chunk in r.response:
        if status_at_first_chunk is None:
            status_at_first_chunk = client.get(job["status_url"]).get_json()["status"]
        chunks.append(chunk)
    r.close()
    assert status_at_first_chunk == "running", "playback could only start after the whole video was made"
    (tmp_path / "streamed.mp4").write_bytes(b"".join(chunks))
    final = _wait(client, job["id"])
    assert final["status"] == "done"
    streamed = probe(tmp_path / "streamed.mp4")
    assert streamed["frames"] == final["frames"]
    (tmp_path / "final.mp4").write_bytes(client.get(job["video_url"]).data)
    info = probe(tmp_path / "final.mp4")
    assert info["audio_duration"] > 40  # twelve sentences
    assert abs(info["video_duration"] - info["audio_duration"]) <= 0.04 + 0.03


@pytest.mark.slow
def test_cancel_a_running_job_and_queue_full_answers_429(client):
    first = client.post("/api/jobs", json={"text": LONG_TEXT, "language": "en"}).get_json()
    _wait(client, first["id"], statuses=("running",))
    assert client.get(first["video_url"]).status_code == 409
    queued = [client.post("/api/jobs", json={"text": "Short one.", "language": "en"}) for _ in range(2)]
    assert all(r.status_code == 202 for r in queued)
    assert queued[1].get_json()["queue_position"] == 2
    full = client.post("/api/jobs", json={"text": "One too many.", "language": "en"})
    assert full.status_code == 429 and full.get_json()["code"] == "queue_full"
    assert int(full.headers["Retry-After"]) >= 1
    r = client.delete(f"/api/jobs/{first['id']}")
    assert r.status_code == 200 and r.get_json()["status"] == "cancelled"
    for q in queued:
        assert _wait(client, q.get_json()["id"])["status"] == "done"


@pytest.mark.parametrize("job_id", ["0" * 32, "nope", "..%2F..%2Fetc%2Fpasswd", "%2E%2E"])
def test_unknown_and_path_like_ids_are_404(client, job_id):
    for method, url in (("get", f"/api/jobs/{job_id}"), ("get", f"/api/jobs/{job_id}/video"),
                        ("get", f"/api/jobs/{job_id}/events"), ("delete", f"/api/jobs/{job_id}")):
        r = getattr(client, method)(url)
        assert r.status_code == 404 and r.get_json()["code"] in ("job_not_found", "not_found")


def test_bad_job_requests_fail_at_submit(client):
    assert client.post("/api/jobs", json={"text": " ", "language": "en"}).get_json()["code"] == "empty_text"
    r = client.post("/api/jobs", json={"text": "Hi", "language": "en", "callback_url": "file:///etc/passwd"})
    assert r.status_code == 400 and r.get_json()["code"] == "invalid_callback_url"


def test_an_idempotency_key_gives_a_retry_the_same_job_and_refuses_another_body(client):
    body = {"text": "Same job.", "language": "en"}
    first = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    retry = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == retry.status_code == 202
    assert retry.get_json()["id"] == first.get_json()["id"]
    other = client.post("/api/jobs", json={"text": "Another job.", "language": "en"},
                        headers={"Idempotency-Key": "order-42"})
    assert other.status_code == 422 and other.get_json()["code"] == "idempotency_key_reused"
    for bad in ("x" * 256, "naïve"):
        r = client.post("/api/jobs", json=body, headers={"Idempotency-Key": bad})
        assert r.status_code == 400 and r.get_json()["code"] == "invalid_idempotency_key"
    fresh = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-43"})
    assert fresh.status_code == 202 and fresh.get_json()["id"] != first.get_json()["id"]
    # deleting the job frees its key
    assert _wait(client, first.get_json()["id"])["status"] == "done"
    assert client.delete(first.get_json()["status_url"]).status_code == 204
    again = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    assert again.status_code == 202 and again.get_json()["id"] != first.get_json()["id"]
    for job in (fresh, again):
        assert _wait(client, job.get_json()["id"])["status"] == "done"
