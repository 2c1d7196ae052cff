"""The HTTP TTS client against a real local HTTP server (no mocked sockets).

The server answers per path: a real MP3 (espeak speech encoded with the
bundled ffmpeg's libmp3lame), a WAV, HTTP 500/503/404, a hang, garbage and
error pages with status 200. It counts hits and records every request.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lipsync.errors import InvalidInputError, TTSError, TTSTimeoutError
from lipsync.media.ffmpeg import run_ffmpeg
from lipsync.settings import Settings
from lipsync.tts import create_provider
from lipsync.tts.espeak import EspeakTTS
from lipsync.tts.remote import HttpTTS
from tests.conftest import skip_or_fail

FAST = dict(backoff=0.01)  # keep retries quick; backoff itself is tested separately


def _wav_bytes(samples: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Real audio answers, made once: speech as MP3, a 22.05 kHz tone as WAV."""
    speech = EspeakTTS().synthesize("Привет! Это проверка удалённого синтеза речи.", "ru")
    pcm = (speech.samples * 32767).astype("<i2").tobytes()
    # To a file, not a pipe: ffmpeg then writes the LAME header with the
    # encoder delay and padding, so decoders can restore the exact length.
    path = tmp_path_factory.mktemp("media") / "speech.mp3"
    run_ffmpeg(["-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "pipe:0",
                "-c:a", "libmp3lame", "-b:a", "64k", str(path)], input=pcm)
    mp3 = path.read_bytes()
    assert mp3[:3] == b"ID3" or mp3[0] == 0xFF
    t = np.arange(int(22050 * 1.25)) / 22050
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    return {"mp3": mp3, "mp3_seconds": speech.duration, "mp3_rms": float(np.sqrt(np.mean(speech.samples ** 2))),
            "wav": _wav_bytes(tone, 22050), "wav_seconds": 1.25}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients we time out hang up on us: expected
        pass


@pytest.fixture(scope="module")
def server(media):
    state = {"hits": {}, "requests": [], "lock": threading.Lock(), "release": threading.Event()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.split("?", 1)[0]
            with state["lock"]:
                state["hits"][path] = state["hits"].get(path, 0) + 1
                hit = state["hits"][path]
                state["requests"].append({"path": self.path, "headers": dict(self.headers), "body": body})
            if path == "/mp3":
                self._send(200, media["mp3"], "audio/mpeg")
            elif path == "/wav":
                self._send(200, media["wav"], "audio/wav")
            elif path == "/octet-wav":  # audio with an unhelpful content type still works
                self._send(200, media["wav"], "application/octet-stream")
            elif path == "/500":
                self._send(500, b"Traceback (most recent call last):\n  File \"/srv/tts.py\"\nKeyError: 'voice'",
                           "text/plain")
            elif path == "/flaky":  # two failures, then audio
                if hit <= 2:
                    self._send(503, b"busy", "text/plain")
                else:
                    self._send(200, media["wav"], "audio/wav")
            elif path == "/404":
                self._send(404, b"no such voice", "text/plain")
            elif path == "/hang":
                state["release"].wait(3.0)
                self._send(200, media["wav"], "audio/wav")
            elif path == "/garbage":
                junk = np.random.default_rng(7).integers(0, 256, 20000, dtype=np.uint8).tobytes()
                self._send(200, junk, "application/octet-stream")
            elif path == "/html":
                self._send(200, b"<!doctype html><html><body>Login required</body></html>", "text/html")
            elif path == "/json":
                self._send(200, json.dumps({"error": "model not loaded"}).encode(), "application/json")
            elif path == "/empty":
                self._send(200, b"", "audio/mpeg")
            elif path == "/trickle":  # the headers at once, then the body a byte every 50 ms
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(media["wav"])))
                self.end_headers()
                self.close_connection = True
                try:
                    for i in range(60):  # 3 s, then it hangs up with the body incomplete
                        self.wfile.write(media["wav"][i:i + 1])
                        time.sleep(0.05)
                except OSError:  # the client gave up
                    pass
            elif path == "/cookie":
                self.send_response(200)
                self.send_header("Set-Cookie", "session=abc123; Path=/")
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(media["wav"])))
                self.end_headers()
                self.wfile.write(media["wav"])
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://example.invalid/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send(400, b"unknown path", "text/plain")

    httpd = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["base"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    state["release"].set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def srv(server):
    """The module's server with its counters reset for this test."""
    with server["lock"]:
        server["hits"].clear()
        server["requests"].clear()
    return server


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_mp3_answer_is_decoded_to_16k_speech(srv, media):
    tts = HttpTTS(srv["base"] + "/mp3", timeout=5, **FAST)
    speech = tts.synthesize("Привет, мир", "ru")
    assert speech.sample_rate == 16000 and speech.samples.dtype == np.float32 and speech.samples.ndim == 1
    assert speech.phonemes == ()
    assert speech.duration == pytest.approx(media["mp3_seconds"], abs=0.01)
    rms = float(np.sqrt(np.mean(speech.samples ** 2)))
    assert rms == pytest.approx(media["mp3_rms"], rel=0.15)
    # What the service received: one POST with exactly this JSON.
    assert srv["hits"] == {"/mp3": 1}
    request = srv["requests"][0]
    assert request["headers"]["Content-Type"].startswith("application/json")
    assert json.loads(request["body"].decode("utf-8")) == {"text": "Привет, мир", "lang": "ru"}


def test_wav_answer_is_resampled_to_16k(srv, media):
    speech = HttpTTS(srv["base"] + "/wav", timeout=5, **FAST).synthesize("Hello", "en")
    assert speech.sample_rate == 16000
    assert speech.duration == pytest.approx(media["wav_seconds"], abs=0.002)
    spectrum = np.abs(np.fft.rfft(speech.samples))
    assert np.argmax(spectrum) * 16000 / len(speech.samples) == pytest.approx(440, abs=2)
    assert json.loads(srv["requests"][0]["body"]) == {"text": "Hello", "lang": "en"}


def test_audio_with_generic_content_type_is_accepted(srv, media):
    speech = HttpTTS(srv["base"] + "/octet-wav", timeout=5, **FAST).synthesize("Сәлем", "kk")
    assert speech.duration == pytest.approx(media["wav_seconds"], abs=0.002)


def test_server_error_is_retried_then_reported(srv):
    tts = HttpTTS(srv["base"] + "/500", timeout=5, retries=2, **FAST)
    with pytest.raises(TTSError) as info:
        tts.synthesize("Hello", "en")
    err = info.value
    assert not isinstance(err, TTSTimeoutError)
    assert err.code == "tts_failed" and err.status == 502
    assert "HTTP 500" in err.message and "3 attempts" in err.message
    assert "Traceback" not in err.message and "KeyError" not in err.message
    assert srv["hits"] == {"/500": 3}  # first try + retries=2


def test_transient_failures_recover(srv):
    speech = HttpTTS(srv["base"] + "/flaky", timeout=5, retries=2, **FAST).synthesize("Hello", "en")
    assert speech.duration > 1.0
    assert srv["hits"] == {"/flaky": 3}


def test_client_error_is_not_retried(srv):
    with pytest.raises(TTSError) as info:
        HttpTTS(srv["base"] + "/404", timeout=5, retries=3, **FAST).synthesize("Hello", "en")
    assert "HTTP 404" in info.value.message and info.value.code == "tts_failed"
    assert srv["hits"] == {"/404": 1}


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_hanging_service_times_out_quickly(srv):
    tts = HttpTTS(srv["base"] + "/hang", timeout=0.5, retries=1, **FAST)
    started = time.monotonic()
    with pytest.raises(TTSTimeoutError) as info:
        tts.synthesize("Hello", "en")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0  # two attempts of 0.5 s, not the 3 s hang
    assert info.value.code == "tts_timeout" and info.value.status == 503
    assert "did not answer within 0.5 s" in info.value.message
    assert srv["hits"] == {"/hang": 2}


@pytest.mark.parametrize("path", ["/garbage", "/html", "/json", "/empty"])
def test_answer_that_is_not_audio_is_an_error(srv, path):
    with pytest.raises(TTSError) as info:
        HttpTTS(srv["base"] + path, timeout=5, retries=2, **FAST).synthesize("Hello", "en")
    assert not isinstance(info.value, TTSTimeoutError)
    assert "not audio" in info.value.message or "instead of audio" in info.value.message
    assert "Login required" not in info.value.message and "model not loaded" not in info.value.message
    assert srv["hits"] == {path: 1}  # a wrong answer is not retried


def test_redirect_is_not_followed(srv):
    with pytest.raises(TTSError) as info:
        HttpTTS(srv["base"] + "/redirect", timeout=5, **FAST).synthesize("Hello", "en")
    assert "HTTP 302" in info.value.message
    assert srv["hits"] == {"/redirect": 1}


def test_connection_refused_is_retried_then_reported(closed_port):
    tts = HttpTTS(f"http://127.0.0.1:{closed_port}/tts", timeout=5, retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(TTSError) as info:
        tts.synthesize("Hello", "en")
    elapsed = time.monotonic() - started
    assert not isinstance(info.value, TTSTimeoutError)
    assert "could not connect" in info.value.message and "3 attempts" in info.value.message
    assert 0.15 <= elapsed < 2.0  # backoff 0.05 + 0.1 between the three attempts


def test_credentials_are_sent_but_never_shown(srv, closed_port):
    tts = HttpTTS(srv["base"].replace("http://", "http://alice:s3cr%40t@") + "/500?api_key=TOPSECRET",
                  timeout=5, retries=0)
    with pytest.raises(TTSError) as info:
        tts.synthesize("Hello", "en")
    request = srv["requests"][0]
    assert request["headers"]["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert request["path"] == "/500?api_key=TOPSECRET"
    for secret in ("s3cr", "alice", "TOPSECRET"):
        assert secret not in info.value.message
        assert secret not in repr(tts) and secret not in tts.endpoint
    refused = HttpTTS(f"http://bob:hunter2@127.0.0.1:{closed_port}/x?token=ZZZ", timeout=5, retries=0)
    with pytest.raises(TTSError) as info:
        refused.synthesize("Hello", "en")
    assert "hunter2" not in info.value.message and "ZZZ" not in info.value.message


def test_bad_requests_fail_before_any_network_call(srv):
    tts = HttpTTS(srv["base"] + "/wav", timeout=5)
    with pytest.raises(InvalidInputError) as info:
        tts.synthesize("  ", "ru")
    assert info.value.code == "empty_text"
    with pytest.raises(InvalidInputError) as info:
        tts.synthesize("Hallo", "de")
    assert info.value.code == "unsupported_language"
    assert srv["hits"] == {}


def test_concurrent_requests(srv, media):
    tts = HttpTTS(srv["base"] + "/wav", timeout=5)
    results, errors = [], []

    def work(i):
        try:
            results.append(tts.synthesize(f"request {i}", "en").duration)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert results == pytest.approx([media["wav_seconds"]] * 6, abs=0.002)
    texts = sorted(json.loads(r["body"])["text"] for r in srv["requests"])
    assert texts == sorted(f"request {i}" for i in range(6))


def test_invalid_urls_are_refused():
    for url in ("", "ftp://host/tts", "not a url", "http:///path"):
        with pytest.raises(ValueError):
            HttpTTS(url)


def test_create_provider_picks_from_settings(srv):
    assert create_provider(Settings()).name == "espeak"
    remote = create_provider(Settings(tts_api_url=srv["base"] + "/wav", tts_timeout=7.0, tts_retries=1))
    assert isinstance(remote, HttpTTS) and remote.name == "http"
    assert remote.timeout == 7.0 and remote.retries == 1
    assert create_provider(Settings(tts_provider="espeak", tts_api_url=srv["base"])).name == "espeak"


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_an_answer_trickling_in_times_out_at_the_deadline(srv):
    """The read timeout bounds each wait on the socket; a body that keeps arriving, a byte at a
    time, must still end the attempt at ``timeout``."""
    tts = HttpTTS(srv["base"] + "/trickle", timeout=0.5, retries=1, **FAST)
    started = time.monotonic()
    with pytest.raises(TTSTimeoutError) as info:
        tts.synthesize("Hello", "en")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0  # two attempts of 0.5 s, not the 3 s the trickle lasts
    assert "did not answer within 0.5 s (2 attempts)" in info.value.message
    assert srv["hits"] == {"/trickle": 2}


def test_requests_carry_what_they_did_and_nothing_more(srv, tmp_path, monkeypatch):
    """No cookie kept between calls, no credentials from ~/.netrc, the body uncompressed."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login mallory password fromnetrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    tts = HttpTTS(srv["base"] + "/cookie", timeout=5)
    tts.synthesize("one", "en")
    tts.synthesize("two", "en")
    for request in srv["requests"]:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert "cookie" not in headers and "authorization" not in headers
        assert headers["accept-encoding"] == "identity" and headers["user-agent"] == "lipsync-tts/1"
    assert len(srv["requests"]) == 2


@pytest.fixture(scope="module")
def tls_server(media, tmp_path_factory):
    """An HTTPS TTS service with a certificate from a CA only the test knows: (base URL, CA file)."""
    if shutil.which("openssl") is None:  # a skip locally, a failure on CI (CI=true): Debian has openssl
        skip_or_fail("needs the openssl command (apt-get install openssl)")
    root = tmp_path_factory.mktemp("tls")
    key, cert = root / "key.pem", root / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(media["wav"])))
            self.end_headers()
            self.wfile.write(media["wav"])

    httpd = _Server(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", str(cert)
    httpd.shutdown()
    httpd.server_close()


def test_https_trusts_the_systems_certificate_authorities(tls_server, media, monkeypatch):
    """As with urllib: the CAs OpenSSL trusts (here SSL_CERT_FILE), not only certifi's bundle."""
    url, ca_file = tls_server
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TTSError) as info:  # a CA nobody trusts: refused
        HttpTTS(url + "/tts", timeout=5, retries=0).synthesize("Hello", "en")
    assert "could not connect" in info.value.message and "CERTIFICATE_VERIFY_FAILED" in info.value.message
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)  # the system now trusts it
    speech = HttpTTS(url + "/tts", timeout=5, retries=0).synthesize("Hello", "en")
    assert speech.duration == pytest.approx(media["wav_seconds"], abs=0.002)
