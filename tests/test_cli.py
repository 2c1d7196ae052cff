"""`python -m lipsync` and `python app.py` as a user runs them, in real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO, wait_until
from tests.media import probe


def _env(tmp_path, **extra) -> dict:
    env = dict(os.environ, OUTPUT_DIR=str(tmp_path / "outputs"), CACHE_DIR=str(tmp_path / "cache"),
               CHECKPOINT_DIR=str(tmp_path / "no-checkpoints"), CHECKPOINT_PATH=str(tmp_path / "none.pt"))
    env.update(extra)
    return env


def _cli(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "lipsync", *args], cwd=REPO, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_generates_from_text(tmp_path):
    out = tmp_path / "hello.mp4"
    r = _cli(tmp_path, "generate", "--text", "Сәлеметсіз бе!", "--language", "kk", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "model builtin" in r.stdout
    info = probe(out)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert abs(info["video_duration"] - info["audio_duration"]) <= 0.08


@pytest.mark.slow
def test_cli_avatar_library_add_use_list_delete(tmp_path):
    from tests.conftest import fixture_path

    r = _cli(tmp_path, "avatars", "add", str(fixture_path("mona_low.jpg")), "--name", "Mona", FACE_DETECTOR="haar")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert entry["id"].startswith("av_") and (entry["width"], entry["height"]) == (1280, 720)
    listed = [json.loads(line)["id"] for line in _cli(tmp_path, "avatars", "list").stdout.splitlines()]
    assert listed == ["default", entry["id"]]
    out = tmp_path / "mona.mp4"
    r = _cli(tmp_path, "generate", "--text", "Hello", "--language", "en", "--avatar-id", entry["id"],
             "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert (probe(out)["width"], probe(out)["height"]) == (1280, 720)
    assert _cli(tmp_path, "avatars", "delete", entry["id"]).returncode == 0
    r = _cli(tmp_path, "generate", "--text", "Hello", "--language", "en", "--avatar-id", entry["id"],
             "--out", str(out), "--quiet")
    assert r.returncode == 1 and "unknown_avatar" in r.stderr
    r = _cli(tmp_path, "avatars", "add", __file__)
    assert r.returncode == 1 and "invalid_image" in r.stderr


@pytest.mark.slow
def test_cli_lip_syncs_a_recording_onto_another_avatar(tmp_path, speech_wav_path):
    from tests.conftest import fixture_path

    avatar = fixture_path("mona_low.jpg")
    out = tmp_path / "mona.mp4"
    r = _cli(tmp_path, "generate", "--audio", str(speech_wav_path), "--avatar", str(avatar), "--out", str(out))
    assert r.returncode == 0, r.stderr
    info = probe(out)
    assert (info["width"], info["height"]) == (1280, 720)
    assert abs(info["video_duration"] - 7.0) < 0.1


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"definitely not audio" * 20)
    out = tmp_path / "x.mp4"
    r = _cli(tmp_path, "generate", "--audio", str(junk), "--out", str(out), "--quiet")
    assert r.returncode == 1
    assert "invalid_audio" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_refuses_a_bad_setting_clearly(tmp_path):
    r = _cli(tmp_path, "health", ENGINE="magic")
    assert r.returncode == 2 and "engine must be one of" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_python_app_py_serves_on_PORT(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=_env(tmp_path, PORT=str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def answered():
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=5) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:  # 503 while loading
                assert json.load(e)["status"] == "loading"
            except OSError:  # not listening yet
                pass
            return None

        health = wait_until(answered, timeout=120, interval=0.3, message="app.py to answer /api/health with 200")
        assert health["status"] == "ready", health
        req = urllib.request.Request(url + "/api/generate", method="POST",
                                     data=json.dumps({"text": "Hello there!", "language": "en"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "video/mp4"
            (tmp_path / "v.mp4").write_bytes(r.read())
        assert probe(tmp_path / "v.mp4")["frames"] > 10
    finally:
        proc.terminate()
        proc.wait(timeout=30)
