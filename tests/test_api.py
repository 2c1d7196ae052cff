"""The HTTP contract, end to end through Flask's test client with the real pipeline.

Engine: the built-in one (no checkpoint in these tests); TTS: embedded espeak-ng.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
import pytest

from lipsync.media.ffmpeg import run_ffmpeg
from lipsync.server import close_app, create_app
from lipsync.settings import Settings
from tests.apps import make_app
from tests.media import moov_before_mdat, probe


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def app(workdir):
    settings = Settings(output_dir=str(workdir / "outputs"), cache_dir=str(workdir / "cache"), engine="builtin",
                        max_text_chars=300, max_upload_bytes=2 * 1024 * 1024)
    app = create_app({"SETTINGS": settings, "LOAD_IN_BACKGROUND": False, "TESTING": True})
    assert app.extensions["lipsync"].status == "ready", app.extensions["lipsync"].error
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def _assert_clean(app):
    """The server is healthy and no request left a working file behind."""
    tmp_root = os.path.join(app.config["SETTINGS"].output_dir, "tmp")
    assert not os.path.exists(tmp_root) or os.listdir(tmp_root) == []
    assert app.test_client().get("/api/health").status_code == 200


def _save(tmp_path, response) -> str:
    path = tmp_path / "out.mp4"
    path.write_bytes(response.data)
    return str(path)


# ------------------------------------------------------------------- health
def test_health_reports_ready_with_engine_tts_and_device(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    h = r.get_json()
    assert h["status"] == "ready" and h["models_loaded"] is True and h["avatar_loaded"] is True
    assert h["device"] == "cpu" and h["engine"] == "builtin" and h["tts_provider"] == "espeak"
    assert {"checkpoint", "version", "face_detector"} <= set(h)


def test_page_has_the_form_and_player(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    for needle in ('<textarea', 'value="ru"', 'value="kk"', 'value="en"', "<video", 'id="generate"',
                   'id="download"', "/api/avatar", "app.js"):
        assert needle in html
    assert client.get("/static/app.js").status_code == 200


def test_avatar_endpoint_serves_the_preloaded_image(client, app):
    r = client.get("/api/avatar")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(r.data, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == app.extensions["lipsync"].avatar.image.shape


# ----------------------------------------------------------------- generate
@pytest.mark.slow
@pytest.mark.parametrize("language,text", [("ru", "Привет! Как у вас дела сегодня?"),
                                           ("kk", "Сәлеметсіз бе! Бүгін ауа райы жақсы."),
                                           ("en", "Hello! How are you doing today?")])
def test_text_becomes_a_playable_mp4_as_long_as_the_speech(client, app, tmp_path, language, text):
    r = client.post("/api/generate", json={"text": text, "language": language})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "video/mp4"
    info = probe(_save(tmp_path, r))
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["fps"] == 25
    assert info["audio_codec"] == "aac"
    assert info["width"] % 2 == 0 and info["height"] % 2 == 0
    assert 1.0 < info["audio_duration"] < 6.0
    assert abs(info["video_duration"] - info["audio_duration"]) <= 0.08
    assert abs(float(r.headers["X-Video-Duration"]) - info["audio_duration"]) < 0.08
    assert moov_before_mdat(str(tmp_path / "out.mp4"))
    timing = r.headers["Server-Timing"]
    for stage in ("tts", "lipsync", "encode", "total"):
        assert f"{stage};dur=" in timing
    assert float(r.headers["X-Processing-Time"]) > 0
    _assert_clean(app)


@pytest.mark.slow
def test_uploaded_recording_is_lip_synced_without_tts(client, app, tmp_path, speech_wav_path):
    mp3 = tmp_path / "speech.mp3"
    run_ffmpeg(["-i", str(speech_wav_path), "-c:a", "libmp3lame", "-b:a", "64k", str(mp3)])
    r = client.post("/api/generate", data={"audio": (io.BytesIO(mp3.read_bytes()), "speech.mp3")},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert "tts;" not in r.headers["Server-Timing"]
    info = probe(_save(tmp_path, r))
    assert abs(info["video_duration"] - 7.0) < 0.12 and abs(info["audio_duration"] - 7.0) < 0.12
    _assert_clean(app)


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_a_compressed_recording_within_the_upload_limit_is_not_refused_after_decoding(tmp_path, speech_wav_path):
    """The limit is on what the client sends: 7 s of MP3 (~60 KB) fits 100 KB, although its
    16 kHz WAV (~270 KB) would not; as a job too (the queue stores the decoded WAV)."""
    mp3 = tmp_path / "speech.mp3"
    run_ffmpeg(["-i", str(speech_wav_path), "-c:a", "libmp3lame", "-b:a", "64k", str(mp3)])
    assert mp3.stat().st_size < 100_000 < 16000 * 2 * 7
    app = make_app(output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), engine="builtin",
                   max_upload_bytes=100_000)
    try:
        client = app.test_client()
        r = client.post("/api/generate", data={"audio": (io.BytesIO(mp3.read_bytes()), "speech.mp3")},
                        content_type="multipart/form-data")
        assert r.status_code == 200, r.get_data(as_text=True)
        r = client.post("/api/jobs", data={"audio": (io.BytesIO(mp3.read_bytes()), "speech.mp3")},
                        content_type="multipart/form-data")
        assert r.status_code == 202, r.get_data(as_text=True)
        state = app.extensions["jobs"].wait(r.get_json()["id"], timeout=120)
        assert state is not None and state["status"] == "done", state
    finally:
        close_app(app)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("body,code", [
    ({"text": "", "language": "ru"}, "empty_text"),
    ({"text": "   \n\t ", "language": "en"}, "empty_text"),
    ({"text": 123, "language": "ru"}, "invalid_text"),
    ({"text": ["a"], "language": "ru"}, "invalid_text"),
    ({"text": "hello", "language": "de"}, "unsupported_language"),
    ({"text": "hello", "language": 7}, "unsupported_language"),
    ({"language": "ru"}, "missing_input"),
    (["text", "ru"], "invalid_json"),
])
def test_bad_json_requests_get_400_with_a_code(client, app, body, code):
    r = client.post("/api/generate", json=body)
    assert r.status_code == 400
    assert r.get_json()["code"] == code and r.get_json()["error"]
    _assert_clean(app)


@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe\x00garbage"])
def test_malformed_json_gets_400(client, data):
    r = client.post("/api/generate", data=data, content_type="application/json")
    assert r.status_code == 400 and r.get_json()["code"] == "invalid_json"


def test_text_over_the_limit_gets_413(client, app):
    r = client.post("/api/generate", json={"text": "а" * 301, "language": "ru"})
    assert r.status_code == 413 and r.get_json()["code"] == "text_too_long"
    assert "300" in r.get_json()["error"]
    _assert_clean(app)


def test_unreadable_audio_gets_400(client, app):
    r = client.post("/api/generate", data={"audio": (io.BytesIO(b"this is not audio" * 50), "speech.mp3")},
                    content_type="multipart/form-data")
    assert r.status_code == 400 and r.get_json()["code"] == "invalid_audio"
    assert "Traceback" not in r.get_data(as_text=True)
    _assert_clean(app)


def test_upload_over_the_limit_gets_413(client, app):
    big = b"\0" * (3 * 1024 * 1024 + 10)
    r = client.post("/api/generate", data={"audio": (io.BytesIO(big), "big.wav")},
                    content_type="multipart/form-data")
    assert r.status_code == 413 and r.get_json()["code"] in ("payload_too_large", "upload_too_large")
    _assert_clean(app)


def test_multipart_without_audio_or_text_gets_400(client):
    r = client.post("/api/generate", data={"language": "ru"}, content_type="multipart/form-data")
    assert r.status_code == 400 and r.get_json()["code"] == "missing_input"


def test_avatar_without_a_face_gets_422(client, app):
    sky = np.zeros((360, 480, 3), np.uint8)
    sky[:] = (235, 206, 135)  # a plain blue-ish sky
    png = cv2.imencode(".png", sky)[1].tobytes()
    r = client.post("/api/generate", data={"text": "Привет", "language": "ru",
                                           "avatar": (io.BytesIO(png), "sky.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 422 and r.get_json()["code"] == "no_face"
    _assert_clean(app)


def test_unknown_api_path_and_method_answer_json(client):
    r = client.get("/api/nope")
    assert r.status_code == 404 and r.get_json()["code"] == "not_found"
    r = client.get("/api/generate")
    assert r.status_code == 405 and r.get_json()["code"] == "method_not_allowed"


# ----------------------------------------------------------- startup errors
def test_avatar_without_face_makes_health_report_the_error(tmp_path):
    path = tmp_path / "wall.png"
    cv2.imwrite(str(path), np.full((200, 200, 3), 128, np.uint8))
    settings = Settings(avatar_path=str(path), output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                        engine="builtin")
    app = create_app({"SETTINGS": settings, "LOAD_IN_BACKGROUND": False})
    client = app.test_client()
    r = client.get("/api/health")
    assert r.status_code == 503
    h = r.get_json()
    assert h["status"] == "error" and "face" in h["error"] and h["avatar_loaded"] is False
    r = client.post("/api/generate", json={"text": "hi", "language": "en"})
    assert r.status_code == 503 and r.get_json()["code"] == "not_ready"
