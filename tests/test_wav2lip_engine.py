"""The Wav2Lip engine on the real avatar and real speech, with random weights.

Random weights say nothing about lip quality, but everything about the
plumbing a user notices: frame count and timing, region and mask geometry,
the model input the spec prescribes, and that requests running at the same
time do not disturb each other.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import torch

from lipsync.engines.base import Region
from lipsync.engines.wav2lip.engine import Wav2LipEngine
from lipsync.engines.wav2lip.model import Wav2Lip, random_generator
from lipsync.errors import InvalidInputError, NoFaceError
from lipsync.faces.box import FaceBox
from lipsync.media import audio
from lipsync.tts.base import Speech
from tests.conftest import fixture_path

BOX = FaceBox(420, 137, 885, 602)       # the avatar's face, marked by hand
REGION = Region(420, 137, 885, 612)     # padded 10 px at the bottom, as the spec says
BATCH = 16


pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    return random_generator(7)


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory) -> Wav2LipEngine:
    path = tmp_path_factory.mktemp("engine") / "random_wav2lip.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "global_step": 1}, path)
    return Wav2LipEngine(str(path), device="cpu", batch_size=BATCH)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img = cv2.imread(str(fixture_path("avatar.jpg")))
    assert img is not None and img.shape == (1483, 1290, 3)
    return img


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return audio.load_audio(str(fixture_path("kennedy_speech_16k.wav")))


@pytest.fixture(scope="module")
def avatar(engine, image):
    return engine.prepare(image, BOX)


def _render(engine, avatar, samples, fps=25) -> tuple[np.ndarray, list[int]]:
    batches = list(engine.render(avatar, Speech(samples), fps))
    return np.concatenate(batches), [len(b) for b in batches]


# ---------------------------------------------------------------- prepare


def test_describe(engine):
    info = engine.describe()
    assert info["engine"] == "wav2lip" and info["checkpoint"] == "random_wav2lip.pth"
    assert info["device"] == "cpu" and info["version"].startswith("training-") and len(info["version"]) > 12


def test_prepare_pads_the_box_and_leaves_the_avatar_alone(engine, image):
    before = image.copy()
    prepared = engine.prepare(image, BOX)
    assert prepared.region == REGION and prepared.box == BOX
    assert np.array_equal(image, before) and prepared.image is image
    # Near the bottom edge the padding is clipped to the image.
    low = engine.prepare(image, FaceBox(400, 1200, 800, 1478))
    assert low.region == Region(400, 1200, 800, 1483)


def test_mask_covers_the_mouth_and_fades_to_nothing_at_the_borders(avatar):
    mask = avatar.mask
    h, w = REGION.height, REGION.width
    assert mask.shape == (h, w, 1) and mask.dtype == np.float32
    m = mask[:, :, 0]
    for border in (m[0], m[-1], m[:, 0], m[:, -1]):
        assert border.max() < 1e-6
    # The mouth of this avatar: about x 585-720, y 490-540 in the image.
    mouth = m[490 - REGION.y1:540 - REGION.y1, 585 - REGION.x1:720 - REGION.x1]
    assert mouth.min() == pytest.approx(1.0)
    # The eyes (y about 310-345) keep the avatar's own sharp pixels.
    assert m[: 345 - REGION.y1].max() < 1e-6
    # Feathered, not cut: no step between neighbouring pixels bigger than a few percent.
    assert np.abs(np.diff(m, axis=0)).max() < 0.05 and np.abs(np.diff(m, axis=1)).max() < 0.05
    # Compositing as the pipeline does shows no seam: the region's edge stays the avatar.
    patch = np.full((h, w, 3), 255.0, np.float32)
    original = avatar.image[REGION.y1:REGION.y2, REGION.x1:REGION.x2].astype(np.float32)
    out = mask * patch + (1 - mask) * original
    assert np.abs(out[0] - original[0]).max() < 1e-3 and np.abs(out[:, -1] - original[:, -1]).max() < 1e-3


def test_bad_inputs_are_refused(engine, avatar, image, samples):
    with pytest.raises(NoFaceError):
        engine.prepare(image, FaceBox(2000, 2000, 2100, 2100))
    with pytest.raises(InvalidInputError):
        engine.prepare(image[:, :, 0], BOX)
    with pytest.raises(InvalidInputError):
        next(engine.render(avatar, Speech(samples[:8000], sample_rate=8000), 25))


# ---------------------------------------------------------------- render


def test_render_feeds_the_model_what_the_spec_prescribes(engine, avatar, model, image, samples):
    """The first frames equal the generator run on a crop and mel windows built by hand from the spec."""
    clip = samples[16000 * 2: 16000 * 2 + 8000]      # 0.5 s of speech
    frames, _ = _render(engine, avatar, clip)
    crop = image[REGION.y1:REGION.y2, REGION.x1:REGION.x2]
    face = cv2.resize(crop, (96, 96), interpolation=cv2.INTER_AREA)
    masked = face.copy()
    masked[48:] = 0
    faces = torch.from_numpy(np.concatenate([masked, face], 2).transpose(2, 0, 1)[None] / 255.0).float()
    mel = audio.melspectrogram(clip)
    windows = np.stack([mel[:, int(i * 80 / 25): int(i * 80 / 25) + 16] for i in range(4)])
    with torch.inference_mode():
        pred = model(torch.from_numpy(windows)[:, None], faces.expand(4, -1, -1, -1))
    pred = pred.permute(0, 2, 3, 1).numpy() * 255
    for i in range(4):
        want = np.clip(cv2.resize(pred[i], (REGION.width, REGION.height), interpolation=cv2.INTER_CUBIC), 0, 255)
        assert np.abs(frames[i].astype(np.float32) - want).max() <= 1.01
    assert np.abs(frames[0].astype(int) - frames[3].astype(int)).max() > 20  # the audio moves the face


@pytest.mark.parametrize("fps", [25, pytest.param(30, marks=pytest.mark.slow)])  # one more render: slow
def test_short_clip_frame_count(engine, avatar, samples, fps):
    clip = samples[40000:40000 + 12345]
    frames, sizes = _render(engine, avatar, clip, fps)
    assert len(frames) == audio.frame_count(len(clip), fps) == sizes[0] + sizes[1]
    assert sizes[0] == BATCH


def test_frames_asked_for_in_another_order_are_the_same_frames(engine, avatar, samples):
    """A segmented MP4 writer asks for frames interleaved: each is the frame time order gives,
    and an order naming a frame twice or past the end is refused."""
    clip = Speech(samples[40000:40000 + 16000])
    want = np.concatenate(list(engine.render(avatar, clip, 25)))
    order = np.random.default_rng(1).permutation(len(want))[:-2]
    got = np.concatenate(list(engine.render(avatar, clip, 25, order=order)))
    assert np.array_equal(got, want[order])
    for bad in ([0, 0], [len(want)]):
        with pytest.raises(ValueError, match="each at most once"):
            next(engine.render(avatar, clip, 25, order=np.array(bad)))


@pytest.mark.slow
def test_full_speech_gives_one_frame_per_video_frame(engine, avatar, samples):
    batches = list(engine.render(avatar, Speech(samples), 25))
    total = sum(len(b) for b in batches)
    assert total == audio.frame_count(len(samples), 25) == 176  # 7.0 s at 25 fps
    for b in batches:
        assert b.dtype == np.uint8 and b.shape[1:] == (REGION.height, REGION.width, 3) and 1 <= len(b) <= BATCH
    frames = np.concatenate(batches)
    # 1.5 s of silence first: its windows (and frames) barely differ; speech changes them.
    silent = frames[5:30].astype(np.float32)
    speaking = frames[60:170].astype(np.float32)
    assert np.abs(np.diff(silent, axis=0)).mean() < np.abs(np.diff(speaking, axis=0)).mean()


@pytest.mark.slow
def test_concurrent_renders_match_serial_ones(engine, avatar, samples):
    clips = [samples[24000:24000 + 32000], samples[56000:56000 + 24000]]  # 2.0 s and 1.5 s: several batches
    serial = [_render(engine, avatar, c)[0] for c in clips]
    results: list = [None, None]
    errors: list = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = _render(engine, avatar, clips[i])[0]
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for got, want in zip(results, serial):
        assert got.shape == want.shape and np.array_equal(got, want)
    assert not np.array_equal(serial[0][:20], serial[1][:20])


def test_the_model_runs_on_one_thread_whichever_thread_asks(engine, image, samples):
    """Every call into the model (the face encoder at prepare, the decoder at render) runs on
    the engine's own thread, also when two request threads ask at once. PyTorch keeps the cuDNN
    kernels ``cudnn.benchmark`` chose per thread: from each request's thread a convolution was
    timed again and could run another kernel, giving another video on a GPU (see
    ``lipsync.engines.wav2lip.engine._EngineThread``)."""
    threads_seen: set[int] = set()
    modules = [module for module in (engine._model, engine._decoder) if module is not None]
    hooks = [m.register_forward_pre_hook(lambda *_: threads_seen.add(threading.get_ident())) for m in modules]
    hooks += [m.register_forward_pre_hook(lambda *_: threads_seen.add(threading.get_ident()))
              for m in engine._model.modules() if isinstance(m, torch.nn.Conv2d)]
    callers: list[int] = []
    errors: list = []
    start = threading.Barrier(2)

    def work() -> None:
        try:
            callers.append(threading.get_ident())
            start.wait()
            avatar = engine.prepare(image, BOX)
            list(engine.render(avatar, Speech(samples[24000:24000 + 8000]), 25))
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    try:
        workers = [threading.Thread(target=work) for _ in range(2)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=300)
    finally:
        for hook in hooks:
            hook.remove()
    assert not errors, errors
    assert len(threads_seen) == 1 and not threads_seen & set(callers) and threading.get_ident() not in threads_seen
