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
from lipsync.media import audio, video
from tests.media import decoded_frames, moov_before_mdat, probe


def _tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _frames(n: int, w: int = 64, h: int = 48):
    for i in range(n):
        frame = np.full((h, w, 3), 40, np.uint8)
        cv2.rectangle(frame, (i % w, 10), (i % w + 8, 30), (0, 200, 255), -1)
        yield frame


def test_mp4_has_h264_aac_25fps_and_the_speech_length(tmp_path):
    samples = _tone(2.0)
    n = 50
    out = tmp_path / "out.mp4"
    with video.Mp4Writer(str(out), 64, 48, 25) as writer:
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


def test_composite_output_round_trips_through_the_encoder(tmp_path):
    """What the viewer sees is what we composited (up to H.264 loss)."""
    image = np.full((96, 128, 3), 90, np.uint8)
    cv2.circle(image, (64, 48), 30, (30, 160, 220), -1)
    out = tmp_path / "o.mp4"
    with video.Mp4Writer(str(out), 128, 96, 25, crf=12) as writer:
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
