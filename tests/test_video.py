"""Compositing and encoding: real ffmpeg, files checked by decoding them."""

from __future__ import annotations

import os
import zlib

import cv2
import numpy as np
import pytest

from lipsync.engines.base import PreparedAvatar, Region
from lipsync.errors import InvalidInputError, MediaError
from lipsync.faces.box import FaceBox
from lipsync.media import audio, ffmpeg, video
from lipsync.service import LipsyncService
from lipsync.settings import Settings, SettingsError
from tests.conftest import skip_or_fail
from tests.media import decoded_frames, moov_before_mdat, probe

# Both H.264 encoders a user may pick (VIDEO_ENCODER); openh264 is the default where ffmpeg has it.
ENCODERS = ["x264", "openh264"]


@pytest.fixture(params=ENCODERS)
def encoder(request) -> str:
    if not ffmpeg.has_encoder(video.H264_ENCODERS[request.param]):
        skip_or_fail(f"the ffmpeg at {ffmpeg.ffmpeg_exe()} has no {video.H264_ENCODERS[request.param]} "
                     "(the pip-bundled one has both)")
    return request.param


def _tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _frames(n: int, w: int = 64, h: int = 48):
    for i in range(n):
        frame = np.full((h, w, 3), 40, np.uint8)
        cv2.rectangle(frame, (i % w, 10), (i % w + 8, 30), (0, 200, 255), -1)
        yield frame


def test_mp4_has_h264_aac_25fps_and_the_speech_length(tmp_path, encoder):
    samples = _tone(2.0)
    n = 50
    out = tmp_path / "out.mp4"
    with video.Mp4Writer(str(out), 64, 48, 25, encoder=encoder) as writer:
        writer.write_audio(samples[:16000])
        for frame in _frames(n):
            writer.write(frame)
        writer.write_audio(samples[16000:])  # speech may arrive in pieces, after frames
    info = probe(out)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["fps"] == 25 and (info["width"], info["height"]) == (64, 48)
    assert info["frames"] == n
    assert info["audio_codec"] == "aac"
    assert info["video_duration"] == 2.0
    assert abs(info["audio_duration"] - 2.0) < 0.05
    assert moov_before_mdat(out)
    assert os.listdir(tmp_path) == ["out.mp4"]  # no partial files left


@pytest.mark.parametrize("frames_before_crash", [0, 1, 30])
def test_failed_render_leaves_no_file(tmp_path, frames_before_crash):
    out = tmp_path / "out.mp4"
    live = tmp_path / "live.mp4"
    with pytest.raises(RuntimeError):
        with video.Mp4Writer(str(out), 64, 48, 25, live_path=str(live)) as writer:
            writer.write_audio(_tone(1.0))
            for frame in _frames(frames_before_crash):
                writer.write(frame)
            raise RuntimeError("engine crashed")
    assert os.listdir(tmp_path) == []


def test_ffmpeg_error_carries_its_stderr_and_leaves_no_file(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(MediaError) as err:
        with video.Mp4Writer(str(out), 64, 48, 25, preset="no-such-preset") as writer:
            writer.write_audio(_tone(1.0))
            for frame in _frames(25):
                writer.write(frame)
    assert "no-such-preset" in str(err.value) or "preset" in str(err.value).lower()
    assert os.listdir(tmp_path) == []


def test_wrong_frame_size_is_refused(tmp_path):
    with pytest.raises(ValueError):
        with video.Mp4Writer(str(tmp_path / "out.mp4"), 64, 48, 25) as writer:
            writer.write(np.zeros((48, 66, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_composite_changes_only_the_masked_region():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    region = Region(20, 30, 60, 50)
    mask = np.zeros((20, 40, 1), np.float32)
    mask[5:15, 10:30] = 1.0
    avatar = PreparedAvatar(image=image, box=FaceBox(10, 10, 70, 55), region=region, mask=mask)
    patches = np.full((3, 20, 40, 3), 255, np.uint8)
    frames = [f.copy() for f in video.composite(avatar, [patches])]
    assert len(frames) == 3
    for frame in frames:
        changed = np.any(frame != image, axis=2)
        assert changed[35:45, 30:50].mean() > 0.95           # the mask's inside is the patch
        assert not changed[:30].any() and not changed[50:].any()
        assert not changed[:, :20].any() and not changed[:, 60:].any()
        assert (frame[35:45, 30:50] == 255).all()


@pytest.mark.parametrize("region, box", [
    (Region(21, 31, 61, 51), (2, 16, 4, 32)),     # odd corners (33..47, 25..53): grown to whole chroma samples
    (Region(40, 30, 80, 60), (0, 30, 0, 40)),     # the box touches the frame's right and bottom edges
    (Region(0, 0, 80, 60), (0, 60, 0, 80)),       # the whole frame
])
def test_composite_i420_is_the_composited_frame_converted(region, box):
    """The still-head path converts only the mouth's box: the same bytes as converting each whole frame."""
    rng = np.random.default_rng(sum(box))
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((region.height, region.width, 1), np.float32)
    y1, y2, x1, x2 = box
    mask[y1:y2, x1:x2] = rng.uniform(0.05, 1.0, (y2 - y1, x2 - x1, 1))
    avatar = PreparedAvatar(image=image, box=FaceBox(region.x1, region.y1, region.x2, region.y2), region=region,
                            mask=mask)
    patches = rng.integers(0, 256, (4, region.height, region.width, 3), dtype=np.uint8)
    batches = [patches[:2], patches[2:]]
    want = [cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420) for frame in video.composite(avatar, batches)]
    got = list(video.composite_i420(avatar, batches))
    assert len(got) == 4
    for g, w in zip(got, want):
        assert g.shape == (90, 80) and np.array_equal(g, w)
    # A new array per frame: a writer keeps each one while the next is made.
    assert not any(np.shares_memory(a, b) for i, a in enumerate(got) for b in got[i + 1:])


def test_composite_i420_with_an_empty_mask_gives_the_avatar():
    image = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    avatar = PreparedAvatar(image=image, box=FaceBox(10, 10, 30, 30), region=Region(10, 10, 30, 30),
                            mask=np.zeros((20, 20, 1), np.float32))
    frames = list(video.composite_i420(avatar, [np.zeros((3, 20, 20, 3), np.uint8)]))
    assert len(frames) == 3
    assert all(np.array_equal(f, cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)) for f in frames)


def test_composite_output_round_trips_through_the_encoder(tmp_path, encoder):
    """What the viewer sees is what we composited (up to H.264 loss)."""
    image = np.full((96, 128, 3), 90, np.uint8)
    cv2.circle(image, (64, 48), 30, (30, 160, 220), -1)
    out = tmp_path / "o.mp4"
    with video.Mp4Writer(str(out), 128, 96, 25, crf=12, encoder=encoder) as writer:
        writer.write_audio(_tone(0.4))
        for _ in range(10):
            writer.write(image)
    decoded = list(decoded_frames(out))
    assert len(decoded) == 10
    assert np.abs(decoded[5].astype(int) - image).mean() < 3


@pytest.mark.parametrize("shape,limit,expected", [((1483, 1290), 720, (720, 626)), ((480, 640), 720, (480, 640)),
                                                  ((101, 77), 720, (100, 76))])
def test_fit_to_height_never_upscales_and_keeps_sides_even(shape, limit, expected):
    out = video.fit_to_height(np.zeros((*shape, 3), np.uint8), limit)
    assert out.shape[:2] == expected


def test_decode_image_converts_grey_and_alpha_to_bgr():
    grey = cv2.imencode(".png", np.full((10, 12), 77, np.uint8))[1].tobytes()
    rgba = cv2.imencode(".png", np.full((10, 12, 4), 99, np.uint8))[1].tobytes()
    assert video.decode_image(grey).shape == (10, 12, 3)
    assert video.decode_image(rgba).shape == (10, 12, 3)


@pytest.mark.parametrize("data", [b"", b"hello, I am a text file renamed .png", b"\x89PNG\r\n\x1a\n" + b"\0" * 10])
def test_decode_image_refuses_what_is_not_an_image(data):
    with pytest.raises(InvalidInputError) as err:
        video.decode_image(data)
    assert err.value.code == "invalid_image"


def test_decode_image_refuses_decompression_bombs_before_decoding():
    png = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    png[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")  # IHDR says 20000x20000
    png[29:33] = zlib.crc32(png[12:29]).to_bytes(4, "big")  # with a valid checksum, as a real bomb has
    with pytest.raises(InvalidInputError) as err:
        video.decode_image(bytes(png))
    assert err.value.code == "image_too_large"


def test_abort_before_ffmpeg_read_anything_is_quick(tmp_path):
    """A render that fails at once must not wait on the speech feeder (it blocks opening the FIFO)."""
    import time

    start = time.monotonic()
    for _ in range(5):
        with pytest.raises(RuntimeError):
            with video.Mp4Writer(str(tmp_path / "out.mp4"), 64, 48, 25):
                raise RuntimeError("failed before any frame")
    assert time.monotonic() - start < 10.0  # a stuck feeder cost 5 s per abort
    assert os.listdir(tmp_path) == []


def test_a_missing_ffmpeg_binary_is_a_media_error_and_leaves_nothing(tmp_path, monkeypatch):
    from lipsync.media import ffmpeg

    ffmpeg.use_binary(str(tmp_path / "no-such-ffmpeg"))
    try:
        with pytest.raises(MediaError) as err:
            video.Mp4Writer(str(tmp_path / "out.mp4"), 64, 48, 25)
        assert "no-such-ffmpeg" in str(err.value)
        with pytest.raises(MediaError):
            audio.load_audio(b"RIFF....WAVE")
    finally:
        ffmpeg.use_binary(None)
    assert os.listdir(tmp_path) == []


def test_the_live_copy_of_an_openh264_encode_is_the_same_video(tmp_path):
    """A streamed request's fragmented copy with openh264 (the default encoder): the same frames
    as the finished file, which plays from the first fragment on."""
    if not ffmpeg.has_encoder("libopenh264"):
        skip_or_fail(f"the ffmpeg at {ffmpeg.ffmpeg_exe()} has no libopenh264 (the pip-bundled one has)")
    out, live = tmp_path / "out.mp4", tmp_path / "live.mp4"
    with video.Mp4Writer(str(out), 64, 48, 25, live_path=str(live), encoder="openh264") as writer:
        writer.write_audio(_tone(3.0))
        for frame in _frames(75):
            writer.write(frame)
    assert probe(live)["frames"] == probe(out)["frames"] == 75
    for a, b in zip(decoded_frames(live), decoded_frames(out)):
        assert np.array_equal(a, b)
    # Short fragments (a player starts after the first): 3 s in fragments of LIVE_FRAGMENT_S at most.
    assert _top_level_boxes(live).count(b"moof") >= 3.0 / video.LIVE_FRAGMENT_S


def _top_level_boxes(path) -> list[bytes]:
    data, kinds, i = open(path, "rb").read(), [], 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        kinds.append(data[i + 4:i + 8])
        if size < 8:
            break
        i += size
    return kinds


@pytest.mark.parametrize("encoder,cores,layout", [("x264", 16, (8, 2)), ("openh264", 16, (16, 1)),
                                                  ("openh264", 2, (1, 0)), ("x264", 4, (1, 0))])
def test_each_encoder_gets_its_fastest_layout_on_every_core(encoder, cores, layout):
    """Segments x threads (docs/PERFORMANCE.md): openh264 threads only across slices, so one
    segment per core; x264 two threads a segment; one stream below SEGMENTED_MIN_CORES."""
    assert Settings().encode_layout(encoder, cores) == layout


def _ffmpeg_without_openh264(tmp_path) -> str:
    """A real ffmpeg as a Debian build is: without libopenh264 (neither listed nor usable)."""
    path = tmp_path / "ffmpeg-no-openh264"
    path.write_text(f"""#!/bin/sh
for a in "$@"; do
  [ "$a" = -encoders ] && {{ "{ffmpeg.ffmpeg_exe()}" "$@" | grep -v libopenh264; exit 0; }}
  [ "$a" = libopenh264 ] && {{ echo "Unknown encoder 'libopenh264'" >&2; exit 1; }}
done
exec "{ffmpeg.ffmpeg_exe()}" "$@"
""")
    path.chmod(0o755)
    return str(path)


def _service(tmp_path, **settings) -> LipsyncService:
    return LipsyncService(Settings(engine="builtin", face_detector="haar", device="cpu", idle_motion=False,
                                   output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                                   **settings)).load()


def test_the_default_encoder_is_openh264_where_ffmpeg_has_it_else_x264(tmp_path, caplog):
    """VIDEO_ENCODER=auto: openh264 with the pip-bundled ffmpeg (health says so), x264 with an
    ffmpeg built without it (a distribution's; the log says how to get openh264), and either
    makes a playable MP4."""
    bundled = _service(tmp_path / "a")
    assert bundled.status == "ready", bundled.error
    expected = "openh264" if ffmpeg.has_encoder("libopenh264") else "x264"
    assert bundled.describe()["video_encoder"] == expected
    plain = _service(tmp_path / "b", ffmpeg_binary=_ffmpeg_without_openh264(tmp_path))
    try:
        assert plain.status == "ready", plain.error
        assert plain.describe()["video_encoder"] == "x264"
        assert any("no libopenh264" in r.getMessage() and "FFMPEG_BINARY" in r.getMessage() for r in caplog.records)
        out = tmp_path / "x264.mp4"
        result = plain.generate(str(out), text="Hello there.", language="en")
        assert probe(out)["frames"] == result.frames > 0
    finally:
        ffmpeg.use_binary(None)


def test_asking_for_an_encoder_this_ffmpeg_lacks_is_a_clear_load_error(tmp_path):
    service = _service(tmp_path, video_encoder="openh264", ffmpeg_binary=_ffmpeg_without_openh264(tmp_path))
    ffmpeg.use_binary(None)
    assert service.status == "error"
    assert "libopenh264" in service.error and "VIDEO_ENCODER" in service.error


def test_an_unknown_encoder_name_is_a_settings_error():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"VIDEO_ENCODER": "h265"})
    assert "video_encoder" in str(err.value).lower() or "VIDEO_ENCODER" in str(err.value)


_KILLED_PARENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from lipsync.live.encoder import LiveEncoder
from lipsync.media import video
writer = video.Mp4Writer(sys.argv[2], 64, 48, 25) if sys.argv[3] == "mp4" else LiveEncoder(64, 48, 25)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["mp4", "live"])
def test_an_encoder_whose_process_is_killed_does_not_outlive_it(tmp_path, kind):
    """A worker killed (SIGKILL, the OOM killer) right after starting its ffmpeg, before any frame
    or sound: the ffmpeg must end too, not wait forever for its speech input."""
    import signal
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, repo, str(tmp_path / "out.mp4"), kind],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        children = open(f"/proc/{parent.pid}/task/{parent.pid}/children").read().split()
        assert len(children) == 1  # its ffmpeg
        encoder = int(children[0])
    finally:
        parent.kill()
        parent.wait()

    def running(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 15
    while running(encoder) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = running(encoder)
    if alive:
        os.kill(encoder, signal.SIGKILL)
    assert not alive, "ffmpeg outlived its killed parent"
