"""A photo that lives (issue 12, part 3): blinks, head sway and breathing, deterministic, switchable.

The schedule is checked on ``idle_track`` itself; what a viewer sees is checked on real MP4s
made by the service from text: the face moves and blinks, the frame's border and the
background never move, the same input gives the same file, and ``idle_motion: false`` (or
``IDLE_MOTION=off``) gives today's still face.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync.faces.landmarks import face_landmarks
from lipsync.faces.locator import FaceLocator
from lipsync.motion.idle import BLINK_EVERY_S, BLINK_LENGTH_S, idle_track, prepare_idle
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from tests.apps import make_app
from tests.conftest import fixture_path
from tests.media import decoded_frames, probe

FPS = 25
TEXT = "Здравствуйте! Я ваш виртуальный помощник. Чем я могу вам помочь сегодня? Спросите меня о чём угодно."


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < mask.size:
        if mask[i]:
            j = i
            while j < mask.size and mask[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def test_blinks_come_every_2_to_6_seconds_and_last_150_to_250_ms():
    track = idle_track(60 * FPS, FPS, seed=11, face_height=200.0)
    blinks = _runs(track.blink > 0)
    assert 9 <= len(blinks) <= 26  # 60 s / (2..6 s + a blink)
    starts = np.array([a for a, _ in blinks]) / FPS
    gaps = np.diff(starts)
    assert gaps.min() >= BLINK_EVERY_S[0] + BLINK_LENGTH_S[0] - 0.05
    assert gaps.max() <= BLINK_EVERY_S[1] + BLINK_LENGTH_S[1] + 0.05
    for a, b in blinks:
        assert 0.15 - 0.04 <= (b - a - 1) / FPS <= 0.25 + 0.04  # frames from first to last touched
        assert track.blink[a:b].max() > 0.8  # the lid really closes
    # Sway and breathing: a few pixels, smooth (no jump between frames).
    assert 1.0 < np.abs(track.dx).max() < 6.0 and np.abs(np.diff(track.dx)).max() < 0.3
    assert np.abs(np.diff(track.dy)).max() < 0.3 and np.degrees(np.abs(track.roll)).max() < 1.0


def test_the_same_seed_gives_the_same_motion_and_sentences_continue_it():
    whole = idle_track(250, FPS, seed=5, face_height=200.0)
    again = idle_track(250, FPS, seed=5, face_height=200.0)
    other = idle_track(250, FPS, seed=6, face_height=200.0)
    assert all(np.array_equal(getattr(whole, k), getattr(again, k)) for k in ("dx", "dy", "roll", "breath", "blink"))
    assert not np.array_equal(whole.dx, other.dx)
    first, second = idle_track(100, FPS, 5, 200.0), idle_track(150, FPS, 5, 200.0, first=100)
    for k in ("dx", "dy", "roll", "breath", "blink"):
        np.testing.assert_allclose(np.concatenate([getattr(first, k), getattr(second, k)]), getattr(whole, k),
                                   atol=1e-5)


def test_a_blink_moves_off_frames_where_the_mouth_jumps():
    free = idle_track(250, FPS, seed=3, face_height=200.0)
    start = _runs(free.blink > 0)[0][0]
    mouth = np.zeros(250)
    mouth[start:] = 1.0  # the jaw drops on the blink's first frame
    moved = idle_track(250, FPS, seed=3, face_height=200.0, mouth_open=mouth)
    assert _runs(moved.blink > 0)[0][0] > start


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("idle")
    settings = Settings(engine="builtin", face_detector="haar", output_dir=str(root / "out"),
                        cache_dir=str(root / "cache"), checkpoint_dir=str(root / "none"),
                        checkpoint_path=str(root / "none" / "x.pt"), s3fd_path=str(root / "none" / "s3fd.pth"),
                        avatar_path=str(fixture_path("avatar.jpg")))
    return LipsyncService(settings).load()


@pytest.fixture(scope="module")
def videos(service, tmp_path_factory):
    out = tmp_path_factory.mktemp("idle-videos")
    paths = {}
    for name, idle in (("on", None), ("off", False)):
        paths[name] = out / f"{name}.mp4"
        service.generate(str(paths[name]), text=TEXT, language="ru", idle_motion=idle)
    return paths


@pytest.mark.slow
def test_the_same_input_gives_the_same_video(service, tmp_path):
    """Byte for byte, from a recording. (espeak-ng's in-process output varies by a few samples
    from call to call, so a text gives the same motion but not the same bytes.)"""
    wav = fixture_path("kennedy_speech_16k.wav").read_bytes()
    one, two, still = tmp_path / "1.mp4", tmp_path / "2.mp4", tmp_path / "still.mp4"
    service.generate(str(one), recording=wav)
    service.generate(str(two), recording=wav)
    service.generate(str(still), recording=wav, idle_motion=False)
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes() != still.read_bytes()


@pytest.mark.slow
def test_the_face_moves_and_blinks_while_the_background_and_border_stay(service, videos):
    avatar = service.avatar
    rig = avatar.idle
    on, off = list(decoded_frames(videos["on"])), list(decoded_frames(videos["off"]))
    assert len(on) == len(off) == probe(videos["on"])["frames"]
    image = avatar.image.astype(np.float32)
    box = avatar.box
    lm = face_landmarks(avatar.image, box)
    r = rig.region
    outside = np.ones(image.shape[:2], bool)
    outside[r.y1:r.y2, r.x1:r.x2] = False
    eyes = lm.points[[33, 133, 263, 362, 159, 145, 386, 374]]
    ex1, ey1 = (eyes.min(axis=0) - 8).astype(int)
    ex2, ey2 = (eyes.max(axis=0) + 8).astype(int)
    eye_change_on, eye_change_off, face_shift = [], [], []
    for a, b in zip(on, off):
        # Outside the moving region, idle motion changes nothing (only encoder noise differs).
        assert np.abs(a.astype(np.float32)[outside] - b.astype(np.float32)[outside]).mean() < 1.0
        eye_change_on.append(np.abs(a[ey1:ey2, ex1:ex2].astype(np.float32) - image[ey1:ey2, ex1:ex2]).mean())
        eye_change_off.append(np.abs(b[ey1:ey2, ex1:ex2].astype(np.float32) - image[ey1:ey2, ex1:ex2]).mean())
        face_shift.append(np.abs(a[box.y1:box.y1 + box.height // 3, box.x1:box.x2].astype(np.float32)
                                 - b[box.y1:box.y1 + box.height // 3, box.x1:box.x2]).mean())
    eye_on, eye_off = np.array(eye_change_on), np.array(eye_change_off)
    # Without idle motion the eyes are the photo's; with it the head sways (the forehead differs
    # from the still video in most frames) and the eyes close now and then.
    assert eye_off.max() < 4.0  # the photo as encoded
    assert (np.array(face_shift) > 1.0).mean() > 0.5
    blinks = _runs(eye_on > np.median(eye_on) + 6.0)
    assert 1 <= len(blinks) <= 4, eye_on.round(1)
    for a, b in blinks:
        assert 2 <= b - a <= 8  # 150-250 ms at 25 fps, a frame either side partly closed


@pytest.mark.slow
def test_the_request_and_the_setting_switch_it_off(tmp_path):
    app = make_app(output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), engine="builtin",
                   face_detector="haar", rate_limit="off", idle_motion=False,
                   avatar_path=str(fixture_path("avatar.jpg")))
    try:
        c = app.test_client()
        r = c.post("/api/generate", json={"text": "Привет!", "idle_motion": "maybe"})
        assert r.status_code == 400 and r.get_json()["code"] == "invalid_input"
        still = c.post("/api/generate", json={"text": "Привет!"})
        moving = c.post("/api/generate", json={"text": "Привет!", "idle_motion": True})
        assert still.status_code == moving.status_code == 200
        (tmp_path / "still.mp4").write_bytes(still.data)
        (tmp_path / "moving.mp4").write_bytes(moving.data)
        image = app.extensions["lipsync"].avatar.image
        box = app.extensions["lipsync"].avatar.box
        forehead = (slice(box.y1, box.y1 + box.height // 3), slice(box.x1, box.x2))
        still_diff = max(np.abs(f[forehead].astype(np.float32) - image[forehead]).mean()
                         for f in decoded_frames(tmp_path / "still.mp4"))
        moving_diff = max(np.abs(f[forehead].astype(np.float32) - image[forehead]).mean()
                          for f in decoded_frames(tmp_path / "moving.mp4"))
        assert still_diff < 3.0 and moving_diff > still_diff + 1.5
    finally:
        from lipsync.server import close_app

        close_app(app)


def test_a_rig_without_landmarks_still_sways_but_never_blinks():
    image = cv2.imread(str(fixture_path("avatar.jpg")))
    box = FaceLocator(detector="haar").locate(image)
    rig = prepare_idle(image, box, None)
    assert rig.eyes == () and not rig.blink_field.any()
    # Nothing moves at the moving region's edge (less than 1/1000 of the sway: 0.003 px).
    assert rig.head.max() > 0.9 and rig.head[0].max() < 1e-3 and rig.head[:, 0].max() < 1e-3


def test_eyebrows_rise_a_touch_on_some_stressed_syllables_and_leave_the_eyes_alone():
    loudness = np.zeros(50 * FPS)
    peaks = np.arange(20, 50 * FPS - 20, 30)  # a stressed syllable every 1.2 s
    loudness[peaks] = 1.0
    track = idle_track(loudness.size, FPS, seed=9, face_height=200.0, mouth_open=loudness)
    raises = _runs(track.brow > 0)
    tops = [a + int(np.argmax(track.brow[a:b])) for a, b in raises]
    assert 5 <= len(raises) < len(peaks)  # some syllables, not all of them
    assert all(np.min(np.abs(peaks - t)) <= 1 for t in tops)  # on a syllable
    assert np.diff(tops).min() / FPS >= 1.5
    assert not idle_track(loudness.size, FPS, seed=9, face_height=200.0).brow.any()  # no sound, no brows
    # On the picture: the brows move up by about 1 % of the face's height, the eyes do not move.
    from lipsync.motion.idle import BROW_RAISE, IdleTrack, apply_idle

    image = cv2.imread(str(fixture_path("avatar.jpg")))
    box = FaceLocator(detector="haar").locate(image)
    rig = prepare_idle(image, box, face_landmarks(image, box))
    zero, one = np.zeros(1, np.float32), np.ones(1, np.float32)
    raised = apply_idle(image, rig, IdleTrack(dx=zero, dy=zero, roll=zero, breath=zero, blink=zero, brow=one), 0)
    for eye in rig.eyes:
        rows = slice(int(eye.upper) - 1, int(eye.lower) + 2)
        assert np.array_equal(raised[rows, int(eye.x1):int(eye.x2)], image[rows, int(eye.x1):int(eye.x2)])
    lm = face_landmarks(image, box)
    brow_row, x = int(lm.points[105, 1]), int(lm.points[105, 0])
    column, moved = image[:, x].astype(np.float32), raised[:, x].astype(np.float32)
    shifts = [np.abs(column[brow_row - 15 + k:brow_row + 15 + k] - moved[brow_row - 15:brow_row + 15]).mean()
              for k in range(0, 8)]
    assert 0.6 * BROW_RAISE * box.height <= int(np.argmin(shifts)) <= 1.4 * BROW_RAISE * box.height + 1


def test_a_frame_is_the_same_drawn_into_a_new_array_into_reused_buffers_or_in_place():
    """The service reuses one output frame and one pair of map buffers for all of a request's
    frames; the live session too. Every frame must come out as if drawn on its own, and the
    source frame stay untouched unless it is the output."""
    from lipsync.motion.idle import apply_idle, map_buffers

    image = cv2.imread(str(fixture_path("avatar.jpg")))
    image = cv2.resize(image, (626, 720), interpolation=cv2.INTER_AREA)
    box = FaceLocator(detector="haar").locate(image)
    rig = prepare_idle(image, box, face_landmarks(image, box))
    track = idle_track(125, FPS, seed=4, face_height=box.height,
                       mouth_open=np.abs(np.sin(np.arange(125) / 3.0)))
    original = image.copy()
    out, maps = np.empty_like(image), map_buffers(rig)
    moved_frames = 0
    for i in range(0, 125, 3):
        alone = apply_idle(image, rig, track, i)
        reused = apply_idle(image, rig, track, i, out=out, maps=maps)
        new_with_maps = apply_idle(image.copy(), rig, track, i, out=None, maps=maps)
        own = image.copy()
        drawn = apply_idle(own, rig, track, i, out=own)
        assert reused is out and drawn is own
        assert np.array_equal(alone, reused) and np.array_equal(alone, new_with_maps) and np.array_equal(alone, drawn)
        assert np.array_equal(image, original)
        moved_frames += not np.array_equal(alone, image)
    assert moved_frames >= 30  # the motion is there: the comparisons are of moved frames
