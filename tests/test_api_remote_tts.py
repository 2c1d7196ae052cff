"""The web API with the remote TTS provider against a real local TTS server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lipsync.media.audio import write_wav
from lipsync.server import create_app
from lipsync.settings import Settings
from lipsync.tts.espeak import EspeakTTS
from tests.media import probe


@pytest.fixture(scope="module")
def tts_server(tmp_path_factory):
    """A TTS service: /ok answers real speech (WAV), /fail a 500, /slow never in time."""
    wav_path = tmp_path_factory.mktemp("tts") / "speech.wav"
    write_wav(str(wav_path), EspeakTTS().synthesize("Hello from the remote voice.", "en").samples)
    speech = wav_path.read_bytes()
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/slow":
                release.wait(5)
            status, body = (200, speech) if self.path == "/ok" else (500, b"internal error")
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()


def _client(tmp_path, url: str):
    settings = Settings(output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), engine="builtin",
                        tts_api_url=url, tts_timeout=0.5, tts_retries=1)
    app = create_app({"SETTINGS": settings, "LOAD_IN_BACKGROUND": False})
    assert app.extensions["lipsync"].status == "ready"
    return app.test_client()


@pytest.mark.slow
def test_remote_speech_becomes_the_video_soundtrack(tmp_path, tts_server):
    client = _client(tmp_path, tts_server + "/ok")
    assert client.get("/api/health").get_json()["tts_provider"] == "http"
    r = client.post("/api/generate", json={"text": "Hello from the remote voice.", "language": "en"})
    assert r.status_code == 200, r.get_data(as_text=True)
    (tmp_path / "v.mp4").write_bytes(r.data)
    info = probe(tmp_path / "v.mp4")
    assert info["audio_codec"] == "aac" and 1.0 < info["audio_duration"] < 4.0


def test_remote_tts_error_is_a_502_and_the_server_stays_healthy(tmp_path, tts_server):
    client = _client(tmp_path, tts_server + "/fail")
    r = client.post("/api/generate", json={"text": "Hello", "language": "en"})
    assert r.status_code == 502
    body = r.get_json()
    assert body["code"] == "tts_failed" and "500" in body["error"] and "internal error" not in body["error"]
    assert client.get("/api/health").status_code == 200


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_remote_tts_timeout_is_a_503(tmp_path, tts_server):
    client = _client(tmp_path, tts_server + "/slow")
    r = client.post("/api/generate", json={"text": "Hello", "language": "en"})
    assert r.status_code == 503 and r.get_json()["code"] == "tts_timeout"
    assert "0.5 s" in r.get_json()["error"]
