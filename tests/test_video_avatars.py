"""Video avatars (issue 12, part 2): a clip of the presenter, looped ping-pong under any speech.

Real files throughout: ``kennedy_low.mp4`` (640x480, 29.97 fps, 206 frames) and clips made
from it with ffmpeg are uploaded through the HTTP API of a real app (built-in engine; one test
runs a random-weights Wav2Lip checkpoint), and the MP4s it returns are decoded and compared,
frame by frame, with the footage as uploaded.
"""

from __future__ import annotations

import os
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from lipsync.media.ffmpeg import ffmpeg_exe
from lipsync.server import close_app
from tests.apps import make_app, no_model_settings
from tests.conftest import fixture_path
from tests.media import decoded_audio, decoded_frames, probe

NTSC = Fraction(30000, 1001)
MAX_SECONDS = 8.0


def _settings(root, **more) -> dict:
    return no_model_settings(root, max_avatar_seconds=MAX_SECONDS, **more)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("video_avatars")


@pytest.fixture(scope="module")
def app(root):
    app = make_app(**_settings(root))
    yield app
    close_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def kennedy(app):
    """kennedy_low.mp4 uploaded once: its library entry."""
    r = _upload(app.test_client(), fixture_path("kennedy_low.mp4").read_bytes(), "kennedy.mp4", "Kennedy")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


@pytest.fixture(scope="module")
def footage():
    """The uploaded clip's own frames, as decoded from the file."""
    return list(decoded_frames(fixture_path("kennedy_low.mp4")))


def _upload(client, data: bytes, filename: str, label: str | None = None):
    import io

    form = {"avatar": (io.BytesIO(data), filename)}
    if label is not None:
        form["name"] = label
    return client.post("/api/avatars", data=form, content_type="multipart/form-data")


def _clip(path, *args: str) -> bytes:
    """A clip made by ffmpeg from kennedy_low.mp4 (``args``: the filters and output options)."""
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(fixture_path("kennedy_low.mp4")), *args,
                    "-c:v", "libx264", "-crf", "18", "-an", str(path)], check=True)
    return path.read_bytes()


def _generate(client, tmp_path, name: str, **body):
    r = client.post("/api/generate", json=body) if "recording" not in body else client.post(
        "/api/generate", data={"audio": (open(body.pop("recording"), "rb"), "speech.wav"), **body},
        content_type="multipart/form-data")
    assert r.status_code == 200, r.get_json()
    path = tmp_path / name
    path.write_bytes(r.data)
    return path


def _ping_pong(k: int, frames: int) -> int:
    cycle = 2 * frames - 2
    c = k % cycle
    return c if c < frames else cycle - c


def _above_mouth(entry) -> int:
    """Rows of the picture above the redrawn lower face (its top: the face box's middle)."""
    x1, y1, x2, y2 = entry["face_box"]
    return y1 + (y2 - y1) * 2 // 5


def test_a_video_is_registered_once_with_a_face_box_per_frame(client, kennedy):
    assert kennedy["kind"] == "video" and kennedy["name"] == "Kennedy"
    assert (kennedy["width"], kennedy["height"], kennedy["frames"]) == (640, 480, 206)
    assert kennedy["fps"] == pytest.approx(29.97, abs=0.01)
    assert kennedy["duration"] == pytest.approx(206 / float(NTSC), abs=0.01)
    boxes = np.array(kennedy["face_boxes"], dtype=float)
    assert boxes.shape == (206, 4)  # found in every frame
    x1, y1, x2, y2 = kennedy["face_box"]
    assert 190 < x1 < 240 and 100 < y1 < 150 and 450 < x2 < 510 and 360 < y2 < 410  # Kennedy's face
    # Smoothed: the box glides with the head, a few pixels per frame at most.
    assert np.abs(np.diff(boxes, axis=0)).max() <= 6
    assert np.ptp(boxes[:, 1]) > 4  # ... and it does follow the head, which nods in this clip
    listed = client.get("/api/avatars").get_json()["avatars"]
    assert kennedy["id"] in [a["id"] for a in listed]
    thumb = client.get(kennedy["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"


@pytest.mark.slow
def test_speech_longer_than_the_clip_plays_it_forwards_then_backwards_in_sync(client, kennedy, footage, tmp_path):
    # 7.5 s of speech on a 6.9 s clip: the footage turns round once, near the end.
    path = _generate(client, tmp_path, "long.mp4", recording=fixture_path("kennedy_speech_16k.wav"),
                     avatar_id=kennedy["id"])
    info = probe(path)
    assert info["fps"] == NTSC and (info["width"], info["height"]) == (640, 480)
    assert info["frames"] > kennedy["frames"]
    # Sound and picture end within one frame of each other (no 25-vs-29.97 drift).
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / float(NTSC) + 1e-3
    out = list(decoded_frames(path))
    rows = _above_mouth(kennedy)
    # Every output frame k shows the clip's frame 0, 1, ..., 205, 204, ... (upper face and background).
    for k in range(0, len(out), 7):
        j = _ping_pong(k, len(footage))
        shown = np.abs(out[k][:rows].astype(int) - footage[j][:rows]).mean()
        other = np.abs(out[k][:rows].astype(int) - footage[(j + 40) % len(footage)][:rows]).mean()
        assert shown < 3.0 and shown < other / 2, (k, j, shown, other)
    # No jump: no change from one frame to the next is larger than the clip's own largest.
    own = max(np.abs(b[:rows].astype(int) - a[:rows]).mean() for a, b in zip(footage, footage[1:]))
    ours = max(np.abs(b[:rows].astype(int) - a[:rows]).mean() for a, b in zip(out, out[1:]))
    assert ours <= own + 0.5, (ours, own)


@pytest.mark.slow
def test_the_mouth_is_redrawn_with_the_speech_and_silence_shows_the_footage(client, kennedy, footage, tmp_path):
    from lipsync.media.audio import frame_loudness

    path = _generate(client, tmp_path, "speech.mp4", recording=fixture_path("kennedy_speech_16k.wav"),
                     avatar_id=kennedy["id"])
    out = list(decoded_frames(path))
    loudness = frame_loudness(decoded_audio(path), len(out), float(NTSC))
    x1, y1, x2, y2 = kennedy["face_box"]
    lower = (slice(y1 + (y2 - y1) // 2, y2), slice(x1, x2))
    upper = (slice(y1, y1 + (y2 - y1) // 2), slice(x1, x2))  # never redrawn: the two encodings' noise

    def changed(k: int, part) -> float:  # how far a part of the face is from the footage's own frame
        return float(np.abs(out[k][part].astype(int) - footage[_ping_pong(k, len(footage))][part]).mean())

    silent = [k for k in range(len(out)) if loudness[max(0, k - 3):k + 4].max() < 0.02]
    loud = [k for k in range(len(out)) if loudness[k] > 0.3]
    assert len(silent) > 30 and len(loud) > 30  # 1.5 s of silence, then speech
    noise = np.median([changed(k, upper) for k in silent + loud])
    quiet_change = np.median([changed(k, lower) for k in silent])
    loud_change = np.median([changed(k, lower) for k in loud])
    assert quiet_change < 1.3 * noise + 0.3, (quiet_change, noise)  # the footage as it was
    assert loud_change > 2.5 * quiet_change, (loud_change, quiet_change)


def test_a_text_request_on_a_video_avatar(client, kennedy, tmp_path):
    path = _generate(client, tmp_path, "text.mp4", text="Привет! Это видеоаватар.", language="ru",
                     avatar_id=kennedy["id"])
    info = probe(path)
    assert info["fps"] == NTSC and info["frames"] > 20
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / float(NTSC) + 1e-3


def test_a_restart_keeps_the_video_avatar(root, kennedy, tmp_path):
    again = make_app(**_settings(root))
    try:
        client = again.test_client()
        assert client.get(f"/api/avatars/{kennedy['id']}").get_json()["face_boxes"] == kennedy["face_boxes"]
        path = _generate(client, tmp_path, "after.mp4", text="Hello again.", language="en", avatar_id=kennedy["id"])
        assert probe(path)["fps"] == NTSC
    finally:
        close_app(again)


def test_a_face_leaving_the_picture_for_a_second_is_left_untouched(client, tmp_path):
    # Frames 60-89 black (the face gone), frames 150-152 too (a flicker, bridged).
    data = _clip(tmp_path / "gap.mp4", "-vf", "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:"
                                              "enable='between(n,60,89)+between(n,150,152)'")
    r = _upload(client, data, "gap.mp4")
    assert r.status_code == 201, r.get_json()
    entry = r.get_json()
    boxes = entry["face_boxes"]
    assert all(b is None for b in boxes[62:88]) and all(b is not None for b in boxes[:58])
    assert all(b is not None for b in boxes[150:153])  # three frames: interpolated across
    path = _generate(client, tmp_path, "gap_out.mp4", recording=fixture_path("kennedy_speech_16k.wav"),
                     avatar_id=entry["id"])
    out = list(decoded_frames(path))
    assert len(out) > 200
    assert max(float(out[k].mean()) for k in range(62, 88)) < 20  # still black: nothing pasted there
    assert client.delete(entry["url"]).status_code == 204


def test_a_frame_rate_outside_24_to_60_becomes_the_default(client, app, tmp_path):
    data = _clip(tmp_path / "slow.mp4", "-t", "3", "-r", "15")
    r = _upload(client, data, "slow.mp4")
    assert r.status_code == 201, r.get_json()
    entry = r.get_json()
    assert entry["fps"] == app.config["SETTINGS"].fps and entry["frames"] == 75
    path = _generate(client, tmp_path, "slow_out.mp4", text="One two three.", language="en", avatar_id=entry["id"])
    assert probe(path)["fps"] == app.config["SETTINGS"].fps
    client.delete(entry["url"])


def _left_over(app) -> list[str]:
    folder = app.config["SETTINGS"].resolved_avatars_dir
    return [n for n in os.listdir(folder) if n.startswith(".")]


@pytest.mark.parametrize(("make", "status", "code"), [
    (lambda p: _clip(p, "-vf", "drawbox=x=0:y=0:w=iw:h=ih:color=gray:t=fill", "-t", "2"), 422, "no_face"),
    (lambda p: _clip(p, "-filter_complex", "[0:v][0:v]hstack", "-t", "1"), 422, "several_faces"),
    (lambda p: _clip(p, "-filter_complex", "loop=loop=1:size=206", "-t", "10"), 413, "video_too_long"),
    (lambda p: b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000), 400, "invalid_video"),
], ids=["no_face", "several_faces", "too_long", "broken"])
def test_bad_videos_get_a_clear_error_and_leave_nothing(client, app, tmp_path, make, status, code):
    before = client.get("/api/avatars").get_json()["avatars"]
    r = _upload(client, make(tmp_path / "bad.mp4"), "bad.mp4")
    assert r.status_code == status, r.get_json()
    body = r.get_json()
    assert body["code"] == code and body["error"]
    if code in ("no_face", "several_faces"):
        assert "frame" in body["error"]
    assert client.get("/api/avatars").get_json()["avatars"] == before
    assert _left_over(app) == []
    assert client.get("/api/health").get_json()["status"] == "ready"


@pytest.mark.slow
def test_the_wav2lip_engine_works_on_a_video_avatar(tmp_path_factory, footage, tmp_path):
    from lipsync.engines.wav2lip.model import save_random_checkpoint
    from lipsync.media.audio import load_audio, write_wav

    root = tmp_path_factory.mktemp("video_wav2lip")
    checkpoint = save_random_checkpoint(root / "random_wav2lip.pth")
    app = make_app(**_settings(root, engine="wav2lip", checkpoint_path=checkpoint, batch_size=16))
    try:
        client = app.test_client()
        entry = _upload(client, fixture_path("kennedy_low.mp4").read_bytes(), "k.mp4").get_json()
        assert entry["kind"] == "video", entry
        # 1 s of silence, then 2 s of speech.
        speech = load_audio(str(fixture_path("kennedy_speech_16k.wav")))[int(0.5 * 16000):int(3.5 * 16000)]
        write_wav(str(tmp_path / "short.wav"), speech)
        r = client.post("/api/generate", data={"audio": (open(tmp_path / "short.wav", "rb"), "s.wav"),
                                               "avatar_id": entry["id"]}, content_type="multipart/form-data")
        assert r.status_code == 200 and r.headers["X-Engine"] == "random_wav2lip", r.get_json()  # the model
        (tmp_path / "w.mp4").write_bytes(r.data)
        info = probe(tmp_path / "w.mp4")
        assert info["fps"] == NTSC and info["frames"] == pytest.approx(3 * float(NTSC), abs=2)
        out = list(decoded_frames(tmp_path / "w.mp4"))
        x1, y1, x2, y2 = entry["face_box"]
        mouth = (slice(y1 + (y2 - y1) * 2 // 3, y2), slice(x1 + (x2 - x1) // 4, x2 - (x2 - x1) // 4))
        rows = _above_mouth(entry)
        for k in (5, 60, 80):  # silent, then speaking (random weights: a very different lower face)
            base = footage[_ping_pong(k, len(footage))]
            assert np.abs(out[k][:rows].astype(int) - base[:rows]).mean() < 3.0
            lower = np.abs(out[k][mouth].astype(int) - base[mouth]).mean()
            assert (lower < 3.0) if k == 5 else (lower > 6.0), (k, lower)
    finally:
        close_app(app)
