"""The production stack (`make serve`: nginx -> gunicorn app + gunicorn stream) under hostile clients.

Real nginx (Debian's package, installed by .ci/run), real gunicorn, TLS with a self-signed
certificate, loopback only, every loop bounded. A slow local TTS holds one job in its TTS
stage for the whole test, so its followers stay connected without the CPU rendering anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

from lipsync.media.audio import pcm_wav
from tests.conftest import REPO, skip_or_fail, wait_until
from tests.test_faults import child_pids, free_port

pytestmark = pytest.mark.slow

HOLD = "Hold this job."  # the TTS answers this text only when the test lets it go


class _TTS:
    """A local TTS: 0.6 s of tone for any text, except HOLD, answered only on release()."""

    def __init__(self):
        t = np.arange(int(0.6 * 16000)) / 16000
        self.wav = pcm_wav((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
        self.released = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if body.get("text") == HOLD:
                    owner.released.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(owner.wav)))
                self.end_headers()
                self.wfile.write(owner.wav)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def _certificate(folder) -> tuple[str, str]:
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_or_fail("openssl is not installed (Debian: openssl)")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        skip_or_fail("nginx is not installed (apt-get install nginx; .ci/run does)")
    root = tmp_path_factory.mktemp("stack")
    cert, key = _certificate(root)
    tts = _TTS()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update(PORT=str(port), HOST="127.0.0.1", OUTPUT_DIR=str(root / "out"), CACHE_DIR=str(root / "cache"),
               ENGINE="builtin", TTS_PROVIDER="http", TTS_API_URL=tts.url, TTS_TIMEOUT="120", TTS_RETRIES="0",
               TLS_CERT=cert, TLS_KEY=key, RATE_LIMIT="off", RATE_LIMIT_READ="off", LOG_LEVEL="WARNING",
               SHUTDOWN_GRACE_SECONDS="5", PYTHONPATH=str(REPO))
    log = open(root / "stack.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lipsync.server.stack"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    session = requests.Session()
    session.verify = False  # self-signed; the test checks TLS is spoken, not who signed it
    session.trust_env = False  # else REQUESTS_CA_BUNDLE in the environment overrides verify=False

    def ready():
        assert proc.poll() is None, (root / "stack.log").read_text()[-3000:]
        try:
            return session.get(base + "/api/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    import urllib3
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    try:
        wait_until(ready, timeout=120, interval=0.5, message="the stack did not become ready")
        yield {"base": base, "port": port, "proc": proc, "session": session, "tts": tts, "log": root / "stack.log"}
    finally:
        tts.released.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        tts.close()
        log.close()


def _footprint(pid: int) -> dict:
    """Threads, open files and resident memory (KiB) of the stack's processes, summed (and by
    process, under "by_pid", for the failure message)."""
    total = {"threads": 0, "files": 0, "rss": 0, "by_pid": {}}
    for p in [pid, *child_pids(pid)]:
        mine = {"threads": 0, "files": 0, "rss": 0}
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key == "Threads":
                        mine["threads"] = int(rest.split()[0])
                    elif key == "VmRSS":
                        mine["rss"] = int(rest.split()[0])
            mine["files"] = len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
        for key, value in mine.items():
            total[key] += value
        total["by_pid"][p] = mine
    return total


def _tls_socket(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def _follow(port: int, path: str, *, wait_for: bytes | None) -> ssl.SSLSocket:
    """A client that asks for ``path`` and keeps the connection open (after ``wait_for`` arrived)."""
    s = _tls_socket(port)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n".encode())
    if wait_for is not None:
        got = b""
        while wait_for not in got:
            chunk = s.recv(4096)
            assert chunk, f"{path} closed before {wait_for!r}: {got[:300]!r}"
            got += chunk
    return s


def test_the_stack_answers_health_and_renders_while_hostile_clients_hold_connections(stack):
    base, port, session = stack["base"], stack["port"], stack["session"]
    # warm up what a normal day touches, then take the baseline
    for _ in range(3):
        assert session.post(base + "/api/generate", json={"text": "Warm up.", "language": "en"},
                            timeout=60).status_code == 200
    before = _footprint(stack["proc"].pid)

    held = session.post(base + "/api/jobs", json={"text": HOLD, "language": "en"}, timeout=10).json()
    wait_until(lambda: session.get(base + held["status_url"], timeout=5).json()["status"] == "running",
               timeout=30, message="the held job never started")
    clients: list[socket.socket] = []
    try:
        for _ in range(200):  # each gets its first SSE event: served by the gevent worker
            clients.append(_follow(port, held["events_url"], wait_for=b"data: "))
        for _ in range(50):   # the live stream of a job that has no frame yet: waits, holds
            clients.append(_follow(port, held["stream_url"], wait_for=None))
        for _ in range(50):   # slowloris: a request line and never the end of the headers
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
            clients.append(s)

        slowest = 0.0
        for _ in range(5):
            t = time.monotonic()
            r = session.get(base + "/api/health", timeout=5)
            slowest = max(slowest, time.monotonic() - t)
            assert r.status_code == 200 and time.monotonic() - t < 1.0, (r.status_code, time.monotonic() - t)
        print(f"[stack] health under load: slowest of 5 in {slowest * 1000:.0f} ms; baseline {before}")
        r = session.post(base + "/api/generate", json={"text": "Still here.", "language": "en"}, timeout=60)
        assert r.status_code == 200 and r.headers["Content-Type"] == "video/mp4" and len(r.content) > 1000
        # the followers are still connected: one more event after the job ends reaches them
    finally:
        for s in clients:
            s.close()
    stack["tts"].released.set()
    wait_until(lambda: session.get(base + held["status_url"], timeout=5).json()["status"] == "done",
               timeout=60, message="the held job did not finish once released")

    def back_to_normal():
        after = _footprint(stack["proc"].pid)
        return all(after[k] <= before[k] * 1.10 + (2 if k != "rss" else 0) for k in ("threads", "files", "rss")), after

    after = wait_until(lambda: (lambda ok, now: now if ok else None)(*back_to_normal()), timeout=60,
                       message=f"threads/files/memory did not return within 10%: before {before}, "
                               f"after {back_to_normal()[1]}")
    print(f"[stack] after: {after}")


def test_a_live_session_through_nginx_with_tls(stack):
    import json as json_

    from simple_websocket import Client

    base, port, session = stack["base"], stack["port"], stack["session"]
    state = session.post(base + "/api/sessions", json={"language": "en"}, timeout=10).json()
    assert state["ws_url"].endswith("/ws"), state
    video = _follow(port, state["video_url"], wait_for=b"moov")  # the endless video, unbuffered
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    ws = Client.connect(f"wss://127.0.0.1:{port}{state['ws_url']}", ssl_context=context)  # upgraded by nginx
    try:
        assert json_.loads(ws.receive(timeout=10))["type"] == "ready"
        ws.send(json_.dumps({"type": "text", "text": "Hello through the proxy. "}))
        events = []
        while not any(e["type"] == "speaking_ended" for e in events):
            raw = ws.receive(timeout=20)
            assert raw is not None, events
            events.append(json_.loads(raw))
        assert events[0]["type"] == "speaking_started" and events[0]["text"] == "Hello through the proxy."
        got = b""
        while got.count(b"moof") < 5:  # fragments keep arriving through nginx
            got += video.recv(65536)
    finally:
        ws.close()
        video.close()
    wait_until(lambda: session.get(base + state["url"], timeout=5).status_code == 404, timeout=10,
               message="closing the WebSocket did not end the session")


def test_nginx_answers_malformed_and_oversized_requests_with_json(stack):
    port = stack["port"]
    # a malformed chunk size never reaches gunicorn: nginx answers 400 in the API's error shape
    s = _tls_socket(port)
    s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
    answer = s.recv(65536).decode("latin-1")
    s.close()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400"), head
    assert json.loads(body)["code"] == "bad_request"
    # two different Content-Length headers (request smuggling): refused
    s = _tls_socket(port)
    s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\n"
              b"hello")
    assert s.recv(65536).startswith(b"HTTP/1.1 400")
    s.close()
    # a body over the upload limit is cut by nginx before gunicorn reads it
    r = stack["session"].post(stack["base"] + "/api/generate", data=b"x" * (27 * 1024 * 1024),
                              headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert stack["session"].get(stack["base"] + "/api/health", timeout=5).status_code == 200


def test_plain_http_on_the_tls_port_is_refused_and_sigterm_drains(stack):
    with pytest.raises(requests.RequestException):
        stack["session"].get(f"http://127.0.0.1:{stack['port']}/api/health", timeout=5).raise_for_status()
    proc = stack["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert child_pids(proc.pid) == []
