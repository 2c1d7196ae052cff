"""Segment-parallel encoding: one seamless MP4 of exactly the frames written (real ffmpeg, every
frame decoded).

Each frame carries its own number in a corner block, so a frame dropped or repeated at a
segment's join shows in the decoded sequence; timestamps and durations are read from the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from lipsync.errors import MediaError
from lipsync.media import audio
from lipsync.media.ffmpeg import wait_exit
from lipsync.media.segments import MIN_SEGMENT_FRAMES, SegmentedMp4Writer, interleaved
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from tests.conftest import fixture_path
from tests.media import decoded_frames, moov_before_mdat, probe

W, H = 96, 64


def _frame(i: int) -> np.ndarray:
    """Frame ``i``: a moving bar (motion for the encoder) and ``i`` in binary, 8 blocks of 8x8."""
    frame = np.full((H, W, 3), 60, np.uint8)
    cv2.rectangle(frame, (i % W, 20), (i % W + 10, 50), (0, 180, 255), -1)
    for bit in range(8):
        frame[:8, bit * 8:(bit + 1) * 8] = 255 if (i >> bit) & 1 else 0
    return frame


def _number(frame: np.ndarray) -> int:
    return sum(1 << bit for bit in range(8) if frame[2:6, bit * 8 + 2:bit * 8 + 6].mean() > 128)


@pytest.fixture(params=["x264", "openh264"])
def encoder(request) -> str:
    """Both H.264 encoders (VIDEO_ENCODER): their segments must join the same way."""
    from lipsync.media import ffmpeg
    from lipsync.media.video import H264_ENCODERS
    from tests.conftest import skip_or_fail

    if not ffmpeg.has_encoder(H264_ENCODERS[request.param]):
        skip_or_fail(f"the ffmpeg at {ffmpeg.ffmpeg_exe()} has no {H264_ENCODERS[request.param]}")
    return request.param


def _write(path, n: int, fps=25, workers: int = 3, end_audio: bool = False, **options) -> None:
    """``n`` numbered frames and as much silence; ``end_audio``: the speech ended before the frames
    (as the service does after its last piece), else by the writer's exit."""
    with SegmentedMp4Writer(str(path), W, H, fps, workers=workers, **options) as writer:
        writer.write_audio(np.zeros(int(round(n * audio.SAMPLE_RATE / fps)), np.float32))
        if end_audio:
            writer.end_audio()
        for i in range(n):
            writer.write(_frame(i))


def _timestamps(path) -> tuple[list[int], list[int]]:
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    return sorted(p.pts for p in packets), [p.dts for p in packets]


@pytest.mark.parametrize("n", [1, 2, MIN_SEGMENT_FRAMES, 49, 50, 51, 53, 54, 137])
def test_segments_join_into_exactly_the_frames_written(tmp_path, n, encoder):
    """Tails of 1..4 frames past a 50-frame segment, several segments, fewer frames than one:
    every frame once, in order, evenly spaced, sound as long as the picture."""
    out = tmp_path / "out.mp4"
    _write(out, n, encoder=encoder)
    info = probe(out)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["audio_codec"] == "aac"
    assert info["frames"] == n and info["fps"] == 25
    assert [_number(f) for f in decoded_frames(out)] == [i % 256 for i in range(n)]
    pts, dts = _timestamps(out)
    assert len(set(np.diff(pts).tolist())) <= 1 and len(set(np.diff(dts).tolist())) <= 1  # no jump at a join
    assert abs(info["audio_duration"] - n / 25) <= 1 / 25
    assert moov_before_mdat(out)
    assert os.listdir(tmp_path) == ["out.mp4"]


@pytest.mark.parametrize("n", [2, 137])
def test_speech_ended_before_the_frames_gives_the_same_mp4(tmp_path, n, encoder):
    """The join started early (once the speech is encoded) makes the very file the join started
    after the last frame makes."""
    _write(tmp_path / "early.mp4", n, encoder=encoder, end_audio=True)
    _write(tmp_path / "late.mp4", n, encoder=encoder)
    assert (tmp_path / "early.mp4").read_bytes() == (tmp_path / "late.mp4").read_bytes()
    assert [_number(f) for f in decoded_frames(tmp_path / "early.mp4")] == list(range(n))
    assert sorted(os.listdir(tmp_path)) == ["early.mp4", "late.mp4"]


def test_speech_after_its_end_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="end_audio"):
        with SegmentedMp4Writer(str(tmp_path / "out.mp4"), W, H, 25, workers=2) as writer:
            writer.write_audio(np.zeros(16000, np.float32))
            writer.end_audio()
            writer.write(_frame(0))
            writer.write_audio(np.zeros(16000, np.float32))
    assert os.listdir(tmp_path) == []


def test_segments_keep_a_fractional_frame_rate(tmp_path, encoder):
    """A video avatar's 29.97 fps across joins: timestamps continue exactly."""
    out = tmp_path / "out.mp4"
    _write(out, 95, fps=Fraction(30000, 1001), encoder=encoder)
    info = probe(out)
    assert info["frames"] == 95 and info["fps"] == Fraction(30000, 1001)
    pts, _ = _timestamps(out)
    assert set(np.diff(pts).tolist()) == {pts[1] - pts[0]}
    assert abs(info["audio_duration"] - 95 * 1001 / 30000) <= 1001 / 30000


def test_segments_start_with_keyframes_every_two_seconds(tmp_path, encoder):
    out = tmp_path / "out.mp4"
    _write(out, 130, encoder=encoder)
    with av.open(str(out)) as container:
        keys = [i for i, p in enumerate(sorted((p for p in container.demux(video=0) if p.size), key=lambda p: p.pts))
                if p.is_keyframe]
    assert {0, 50, 100} <= set(keys)  # (and x264's own at a scene cut: the bar wraps round at frame 96)


def test_segmented_frames_are_those_of_one_stream(tmp_path, encoder):
    """The same encoder settings segment by segment: the decoded pictures are as close to the
    source as one stream's (the encoder's loss, not a shifted or repeated frame)."""
    out = tmp_path / "out.mp4"
    _write(out, 120, encoder=encoder)
    errors = [np.abs(f.astype(int) - _frame(i)).mean() for i, f in enumerate(decoded_frames(out))]
    assert max(errors) < 3.0


def test_interleaved_takes_each_segment_in_turn_in_time_order():
    assert interleaved([3, 2, 2]).tolist() == [0, 3, 5, 1, 4, 6, 2]
    assert interleaved([4]).tolist() == [0, 1, 2, 3]


def _keyframes(path) -> list[int]:
    with av.open(str(path)) as container:
        packets = sorted((p for p in container.demux(video=0) if p.size), key=lambda p: p.pts)
    return [i for i, p in enumerate(packets) if p.is_keyframe]


def _write_planned(path, blocks, workers: int = 3, encoder: str = "openh264") -> list[np.ndarray]:
    """Write blocks of frames: ("order", n) as the writer's frame_order asks, ("time", n) in
    time order. Returns each planned block's order."""
    orders = []
    total = sum(n for _, n in blocks)
    with SegmentedMp4Writer(str(path), W, H, 25, workers=workers, encoder=encoder) as writer:
        writer.write_audio(np.zeros(int(round(total * audio.SAMPLE_RATE / 25)), np.float32))
        for kind, n in blocks:
            first = writer.frames
            order = writer.frame_order(n) if kind == "order" else np.arange(n)
            orders.append(order)
            for i in order:
                writer.write(_frame(first + int(i)))
    return orders


@pytest.mark.parametrize("n", [100, 160, 233])
def test_frames_written_in_the_planned_order_join_into_time_order(tmp_path, n, encoder):
    """Two keyframe intervals or more are cut into equal segments (one per encoder) taken in
    turn; the MP4 holds every frame once, in time order, evenly spaced, a keyframe at every
    segment's start and at most 3 s apart."""
    out = tmp_path / "out.mp4"
    order, = _write_planned(out, [("order", n)], workers=3, encoder=encoder)
    assert sorted(order.tolist()) == list(range(n)) and order.tolist() != list(range(n))
    info = probe(out)
    assert info["frames"] == n and info["fps"] == 25 and abs(info["audio_duration"] - n / 25) <= 1 / 25
    assert [_number(f) for f in decoded_frames(out)] == list(range(n))
    pts, dts = _timestamps(out)
    assert len(set(np.diff(pts).tolist())) == 1 and len(set(np.diff(dts).tolist())) == 1
    segments = min(3, n // 50)
    starts = [k * n // segments for k in range(segments)]  # equal sizes (to a frame)
    keys = _keyframes(out)
    assert all(any(abs(k - s) <= 1 for k in keys) for s in starts)
    assert max(np.diff([*keys, n])) <= 75
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_planned_and_time_ordered_frames_mix(tmp_path):
    """A few frames in time order, a plan (which goes on with their short segment), more in time
    order, a plan too short to cut (time order), another plan: one video, every frame once."""
    out = tmp_path / "out.mp4"
    blocks = [("time", 3), ("order", 110), ("time", 30), ("order", 10), ("order", 100)]
    orders = _write_planned(out, blocks, workers=2)
    assert orders[3].tolist() == list(range(10))
    total = sum(n for _, n in blocks)
    assert probe(out)["frames"] == total
    assert [_number(f) for f in decoded_frames(out)] == list(range(total))
    pts, _ = _timestamps(out)
    assert len(set(np.diff(pts).tolist())) == 1


def test_a_plan_left_unfinished_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="not written"):
        with SegmentedMp4Writer(str(tmp_path / "out.mp4"), W, H, 25, workers=2) as writer:
            writer.write_audio(np.zeros(16000, np.float32))
            for i in writer.frame_order(120)[:70]:
                writer.write(_frame(int(i)))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("end_audio", [False, True])
@pytest.mark.parametrize("written", [0, 3, 60])
def test_a_failed_render_leaves_nothing(tmp_path, written, end_audio):
    """Before or after the speech ended (the join's ffmpeg started, waiting for segments): every
    ffmpeg ends, no file is left."""
    with pytest.raises(RuntimeError):
        with SegmentedMp4Writer(str(tmp_path / "out.mp4"), W, H, 25, workers=2) as writer:
            writer.write_audio(np.zeros(16000, np.float32))
            if end_audio:
                writer.end_audio()
                writer._joiner.join(30)  # the speech encoded, the join's ffmpeg waiting on its stdin
                assert writer._join.poll() is None
            for i in range(written):
                writer.write(_frame(i))
            raise RuntimeError("engine crashed")
    assert os.listdir(tmp_path) == []
    assert all(proc.poll() is not None for proc in [*writer._procs, writer._audio_proc])


def test_an_ffmpeg_failure_is_a_media_error_and_leaves_nothing(tmp_path):
    with pytest.raises(MediaError):
        _write(tmp_path / "out.mp4", 60, preset="no-such-preset")
    assert os.listdir(tmp_path) == []


def test_the_service_makes_the_same_length_with_segments_or_one_stream(tmp_path):
    """A recording through the whole pipeline, ENCODE_WORKERS=3 vs 1: same frame count and
    durations, and (idle motion off) frames within the encoder's loss of each other."""
    wav = open(fixture_path("kennedy_speech_16k.wav"), "rb").read()
    results = {}
    for workers in (1, 3):
        settings = Settings(engine="builtin", face_detector="haar", device="cpu", encode_workers=workers,
                            output_dir=str(tmp_path / f"out{workers}"), cache_dir=str(tmp_path / "cache"),
                            avatar_path=str(fixture_path("avatar.jpg")), max_output_height=360, idle_motion=False)
        service = LipsyncService(settings).load()
        assert service.status == "ready", service.error
        path = tmp_path / f"w{workers}.mp4"
        result = service.generate(str(path), recording=wav)
        results[workers] = (result, probe(path), list(decoded_frames(path)))
    (one, one_info, one_frames), (seg, seg_info, seg_frames) = results[1], results[3]
    assert seg.frames == one.frames == seg_info["frames"] == one_info["frames"]
    assert seg_info["audio_duration"] == pytest.approx(one_info["audio_duration"], abs=1e-3)
    assert abs(seg_info["audio_duration"] - seg_info["video_duration"]) <= 1 / 25
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(one_frames, seg_frames)) < 2.0


def test_waiting_for_an_ffmpeg_gives_its_exit_code_and_times_out_as_popen_wait_does():
    """``wait_exit`` (the join's and the encoders' wait): the exit code once the process ends,
    ``TimeoutExpired`` (the process left running) when it does not end in time, and the code
    again for a process already waited for."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"])
    with pytest.raises(subprocess.TimeoutExpired):
        wait_exit(proc, 0.05)
    assert proc.poll() is None
    assert wait_exit(proc, 30) == 3
    assert wait_exit(proc, 0) == 3
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert wait_exit(done, 1) == 0
