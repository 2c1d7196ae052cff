"""What an attacker's raw requests get from the servers themselves (issue: the production server
holds under hostile clients): malformed chunked bodies, ambiguous framing, too many connections,
too many form parts, odd Range headers. Real servers on loopback: ``python app.py`` (werkzeug)
and gunicorn with the project's config; raw sockets, so nothing is tidied up by a client library.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.apps import unlimited_app
from tests.conftest import REPO, wait_until
from tests.test_faults import free_port

TEXT = {"text": "Range.", "language": "en"}


def _exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send ``raw`` on a fresh connection; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"closed without an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def _server(tmp_path, cmd: list[str], env_extra: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update(PORT=str(port), HOST="127.0.0.1", OUTPUT_DIR=str(tmp_path / "out"), CACHE_DIR=str(tmp_path / "c"),
               ENGINE="builtin", RATE_LIMIT="off", RATE_LIMIT_READ="off", PYTHONPATH=str(REPO), **env_extra)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def up():
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        try:
            return _exchange(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 2)[0] == 200
        except OSError:
            return False

    wait_until(up, timeout=90, interval=0.2, message="the server did not become ready")
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


MALFORMED_CHUNK = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory):
    proc, port = _server(tmp_path_factory.mktemp("dev"), [sys.executable, "app.py"], {"MAX_CONNECTIONS": "4"})
    yield port
    _stop(proc)


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("gunicorn")
    port_env = {}
    proc, port = _server(root, [sys.executable, "-m", "gunicorn", "-c", "python:lipsync.server.gunicorn_conf"],
                         port_env)
    yield port
    _stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["dev_server", "gunicorn_server"])
def test_a_malformed_chunk_size_is_a_400_with_json_not_a_500(which, request):
    port = request.getfixturevalue(which)
    status, headers, body = _exchange(port, MALFORMED_CHUNK)
    assert status == 400, body
    assert headers["content-type"] == "application/json" and json.loads(body)["code"] in ("invalid_body",
                                                                                           "bad_request")
    assert b"Traceback" not in body
    assert _exchange(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200


@pytest.mark.slow
@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\nContent-Length: 50\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
])
def test_the_dev_server_refuses_ambiguous_message_framing(dev_server, framing):
    request = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing
    status, _, body = _exchange(dev_server, request + b"\r\nhello")
    assert status == 400 and json.loads(body)["code"] == "bad_request"


@pytest.mark.slow
def test_the_dev_server_caps_its_connections_and_recovers(dev_server):
    idle = []
    try:
        for _ in range(4):  # MAX_CONNECTIONS=4 clients that never finish their headers
            s = socket.create_connection(("127.0.0.1", dev_server), timeout=10)
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
            idle.append(s)
        time.sleep(0.2)  # let the server take all four (accept is asynchronous); the check below waits anyway
        status, _, body = wait_until(
            lambda: (lambda r: r if r[0] == 503 else None)(_exchange(dev_server, b"GET /api/health HTTP/1.1\r\n"
                                                                                  b"Host: x\r\n\r\n")),
            timeout=10, message="a fifth connection was not refused while four were open")
        assert json.loads(body)["code"] == "busy"
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: _exchange(dev_server, b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0]
               == 200, timeout=10, message="the server did not take connections again")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with unlimited_app(tmp_path_factory.mktemp("hostile")) as app:
        yield app


def test_a_form_with_thousands_of_parts_is_refused_for_what_it_is(app):
    fields = "".join(f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(5000))
    body = (fields + "--b--\r\n").encode()
    assert len(body) < 400_000
    r = app.test_client().post("/api/generate", data=body, content_type="multipart/form-data; boundary=b")
    assert r.status_code == 413
    assert r.get_json()["code"] == "too_many_parts" and "parts" in r.get_json()["error"]


@pytest.fixture(scope="module")
def finished_job(app):
    client = app.test_client()
    job = client.post("/api/jobs", json=TEXT).get_json()
    state = app.extensions["jobs"].wait(job["id"], timeout=120)
    assert state is not None and state["status"] == "done", state
    whole = client.get(job["video_url"]).data
    return job, whole


@pytest.mark.parametrize("header", ["items=0-5", "bytes=abc", "bytes=5-2x", "bytes", "bytes=-"])
def test_a_range_header_the_server_cannot_read_is_ignored(app, finished_job, header):
    job, whole = finished_job
    r = app.test_client().get(job["video_url"], headers={"Range": header})
    assert r.status_code == 200 and r.data == whole


def test_a_suffix_range_longer_than_the_file_is_the_whole_file(app, finished_job):
    job, whole = finished_job
    r = app.test_client().get(job["video_url"], headers={"Range": f"bytes=-{len(whole) * 10}"})
    assert r.status_code == 206 and r.data == whole
    assert r.headers["Content-Range"] == f"bytes 0-{len(whole) - 1}/{len(whole)}"
    # ordinary ranges are untouched
    r = app.test_client().get(job["video_url"], headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.data == whole[:100]
    r = app.test_client().get(job["video_url"], headers={"Range": f"bytes={len(whole) + 10}-"})
    assert r.status_code == 416


def test_an_upload_form_still_works_with_the_part_limit(app, speech_wav_path):
    r = app.test_client().post("/api/jobs", data={"audio": (io.BytesIO(speech_wav_path.read_bytes()), "a.wav"),
                                                  "language": "en"},
                               content_type="multipart/form-data")
    assert r.status_code == 202, r.get_data(as_text=True)
