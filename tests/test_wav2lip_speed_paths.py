"""The optimised Wav2Lip paths compute what the plain ones compute.

Random weights (BatchNorm statistics measured, then perturbed) and fresh
random inputs: the still-face decoder (BatchNorm folded, face terms
precomputed, rows cropped), channels-last, ONNX Runtime, the GPU-style
post-processing (run here on the CPU), mouth-only rendering and the faster
composite must match the plain fp32 computation. Speed is measured by
bench/bench_wav2lip.py, never here.

The tests that render through whole engines (each builds one or two, exports
ONNX or quantises) take seconds each on a CPU: they are marked ``slow`` and
run by ``make test``; the decoder, resize and composite tests stay in the fast suite.
"""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from lipsync.engines.base import PreparedAvatar, Region
from lipsync.engines.wav2lip.engine import MASK_TOP_ZERO, Wav2LipEngine, feather_mask, resize_faces_torch
from lipsync.engines.wav2lip.model import (
    StillFaceDecoder,
    Wav2Lip,
    mouth_rows_start,
    random_generator,
    save_random_checkpoint,
)
from lipsync.errors import LipsyncError
from lipsync.faces.box import FaceBox
from lipsync.media import audio, video
from lipsync.tts.base import Speech
from tests.conftest import skip_or_fail

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNX = importlib.util.find_spec("onnx") is not None
BOX = FaceBox(60, 40, 200, 190)


pytestmark = pytest.mark.usefixtures("torch_threads")


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mel = torch.rand(batch, 1, 80, 16, generator=gen) * 8 - 4
    face = torch.rand(1, 6, 96, 96, generator=gen)
    face[:, :3, 48:] = 0
    return mel, face


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    return random_generator(3)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> str:
    return save_random_checkpoint(tmp_path_factory.mktemp("speed") / "random_wav2lip.pth", model=model)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(5)
    img = cv2.GaussianBlur(rng.integers(0, 256, (240, 256, 3), dtype=np.uint8), (0, 0), 3)
    cv2.ellipse(img, (130, 150), (40, 18), 0, 0, 360, (40, 40, 160), -1)  # a "mouth" with edges
    return img


@pytest.fixture(scope="module")
def speech() -> Speech:
    t = np.arange(int(0.8 * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    wave = 0.4 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    wave += 0.05 * np.random.default_rng(1).standard_normal(len(t))
    return Speech(wave.astype(np.float32))


def _frames(engine: Wav2LipEngine, image, speech) -> tuple[PreparedAvatar, np.ndarray]:
    avatar = engine.prepare(image, BOX)
    return avatar, np.concatenate(list(engine.render(avatar, speech, 25)))


def _composited(avatar: PreparedAvatar, patches: np.ndarray) -> np.ndarray:
    return np.stack([f.copy() for f in video.composite(avatar, [patches])])


# ------------------------------------------------------------------ the decoder


# the edge cases and the engine's own start row run in the fast suite; the rest are marked slow
@pytest.mark.parametrize("rows_from", [0, *[pytest.param(r, marks=pytest.mark.slow) for r in (1, 2)],
                                       mouth_rows_start(MASK_TOP_ZERO),
                                       *[pytest.param(r, marks=pytest.mark.slow) for r in (47, 71)], 95])
def test_still_face_decoder_equals_decode(model, rows_from):
    mel, face = _inputs(5, seed=rows_from)
    with torch.inference_mode():
        features = model.encode_faces(face)
        want = model.decode(mel, features)[:, :, rows_from:]
        decoder = StillFaceDecoder(model, rows_from).eval()
        got = decoder(mel, *decoder.constants(features))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def test_still_face_decoder_channels_last_equals_contiguous(model):
    mel, face = _inputs(4, seed=11)
    with torch.inference_mode():
        features = model.encode_faces(face)
        plain = StillFaceDecoder(model, 40).eval()
        want = plain(mel, *plain.constants(features))
        cl = StillFaceDecoder(model, 40).eval().to(memory_format=torch.channels_last)
        consts = [c.contiguous(memory_format=torch.channels_last) for c in cl.constants(features)]
        got = cl(mel.contiguous(memory_format=torch.channels_last), *consts)
    assert (got - want).abs().max().item() < 1e-4


def test_mouth_rows_cover_what_the_mask_shows():
    start = mouth_rows_start(MASK_TOP_ZERO)
    for height in (60, 96, 235, 475, 900):
        mask = feather_mask(height, 100)[:, :, 0]
        first_shown = int(np.flatnonzero(mask.max(axis=1) > 0)[0])
        # the face row a bicubic resize reads first for that region row
        src = (first_shown + 0.5) * 96 / height - 0.5
        assert int(np.floor(src)) - 1 >= start


def test_bad_decoder_arguments(model):
    with pytest.raises(ValueError):
        StillFaceDecoder(model, 96)
    with pytest.raises(TypeError):
        StillFaceDecoder(torch.jit.script(nn.Identity()))  # not an eager Wav2Lip
    decoder = StillFaceDecoder(model)
    with torch.inference_mode(), pytest.raises(ValueError):
        decoder.constants(model.encode_faces(torch.rand(2, 6, 96, 96)))


# ------------------------------------------------------------------ post-processing and compositing


@pytest.mark.parametrize("size", [(235, 226), (475, 465), (60, 50), (96, 96)])
def test_gpu_resize_matches_opencv(size):
    height, width = size
    faces = np.random.default_rng(height).uniform(-30, 285, (3, 96, 96, 3)).astype(np.float32)
    want = np.stack([np.rint(np.clip(cv2.resize(f, (width, height), interpolation=cv2.INTER_CUBIC), 0, 255))
                     for f in faces]).astype(np.int16)
    got = resize_faces_torch(torch.from_numpy(faces).permute(0, 3, 1, 2), height, width).numpy()
    assert got.dtype == np.uint8 and got.shape == (3, height, width, 3)
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max() <= 1 and diff.mean() < 0.01  # rounding of exact ties only


def test_composite_equals_the_plain_blend():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)
    region = Region(30, 20, 110, 115)
    mask = feather_mask(region.height, region.width)
    avatar = PreparedAvatar(image=image, box=FaceBox(30, 20, 110, 105), region=region, mask=mask)
    patches = rng.integers(0, 256, (4, region.height, region.width, 3), dtype=np.uint8)
    got = _composited(avatar, patches)
    base = image[20:115, 30:110].astype(np.float32)
    for frame, patch in zip(got, patches):
        want = image.copy()
        blended = base + mask * (patch.astype(np.float32) - base)
        want[20:115, 30:110] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        assert np.abs(frame.astype(int) - want).max() <= 1
        assert np.array_equal(frame[:20], image[:20]) and np.array_equal(frame[:, :30], image[:, :30])


def test_composite_with_an_empty_mask_gives_the_avatar():
    image = np.full((50, 60, 3), 77, np.uint8)
    region = Region(10, 10, 40, 40)
    avatar = PreparedAvatar(image=image, box=FaceBox(10, 10, 40, 40), region=region,
                            mask=np.zeros((30, 30, 1), np.float32))
    frames = _composited(avatar, np.zeros((3, 30, 30, 3), np.uint8))
    assert len(frames) == 3 and (frames == 77).all()


# ------------------------------------------------------------------ the engine's paths


def _reference_patches(model, avatar, speech) -> np.ndarray:
    faces = torch.from_numpy(np.concatenate([np.where(np.arange(96)[:, None, None] >= 48, 0, avatar.state.crop),
                                             avatar.state.crop], 2).transpose(2, 0, 1)[None] / 255.0).float()
    windows = audio.mel_windows(audio.melspectrogram(speech.samples), 25)
    with torch.inference_mode():
        pred = model(torch.from_numpy(windows)[:, None], faces.expand(len(windows), -1, -1, -1))
    pred = pred.permute(0, 2, 3, 1).numpy() * 255
    r = avatar.region
    return np.stack([np.rint(np.clip(cv2.resize(p, (r.width, r.height), interpolation=cv2.INTER_CUBIC), 0, 255))
                     for p in pred]).astype(np.uint8)


@pytest.mark.slow
def test_torch_fp32_path_matches_the_plain_model(model, checkpoint, image, speech):
    engine = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, backend="torch")
    avatar, frames = _frames(engine, image, speech)
    want = _reference_patches(model, avatar, speech)
    assert frames.shape == want.shape
    assert np.abs(frames.astype(int) - want).max() <= 1
    assert engine.describe()["backend"] == "torch" and engine.describe()["precision"] == "fp32"


@pytest.mark.slow
def test_mouth_only_changes_no_composited_pixel(checkpoint, image, speech):
    full = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, backend="torch")
    mouth = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, backend="torch", mouth_only=True)
    avatar, want = _frames(full, image, speech)
    avatar_m, got = _frames(mouth, image, speech)
    assert mouth.describe()["mouth_only"] is True and mouth.rows_from > 30
    composited_want, composited_got = _composited(avatar, want), _composited(avatar_m, got)
    assert np.abs(composited_got.astype(int) - composited_want).max() <= 1
    shown = avatar.mask[..., 0] > 0
    assert np.abs(got.astype(int) - want)[:, shown].max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("mouth_only", [False, True])
def test_gpu_style_render_matches_the_cpu_render(checkpoint, image, speech, mouth_only):
    """The CUDA path's post-processing (pad, decode, torch resize, uint8) run on the CPU."""
    engine = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, backend="torch", mouth_only=mouth_only)
    avatar, want = _frames(engine, image, speech)
    windows = torch.from_numpy(audio.mel_windows(audio.melspectrogram(speech.samples), 25)).unsqueeze(1)
    got = np.concatenate([engine._render_cuda(windows[i:i + 8], avatar.state, avatar.region.height,
                                              avatar.region.width).numpy() for i in range(0, len(windows), 8)])
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= 1


@pytest.mark.slow
def test_onnxruntime_fp32_matches_torch(checkpoint, image, speech):
    if not HAS_ORT:
        skip_or_fail("onnxruntime is not installed (requirements.txt)")
    ort = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, backend="onnxruntime", mouth_only=True)
    ref = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, backend="torch", mouth_only=True)
    _, got = _frames(ort, image, speech)
    _, want = _frames(ref, image, speech)
    assert ort.describe()["backend"] == "onnxruntime"
    assert np.abs(got.astype(int) - want).max() <= 1


@pytest.mark.slow
def test_int8_checks_itself_and_falls_back_to_fp32_when_it_is_off(checkpoint, image, speech):
    if not (HAS_ORT and HAS_ONNX):
        skip_or_fail("int8 needs onnxruntime and onnx (requirements.txt)")
    strict = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, precision="int8", mouth_only=True,
                           int8_max_error=0.0)
    _, frames = _frames(strict, image, speech)
    info = strict.describe()
    assert info["int8_error"] > 0 and info["precision"] == "fp32"  # random weights: int8 is refused
    fp32 = Wav2LipEngine(checkpoint, device="cpu", batch_size=8, backend="onnxruntime", mouth_only=True)
    _, want = _frames(fp32, image, speech)
    assert np.abs(frames.astype(int) - want).max() <= 1


def test_impossible_settings_are_refused(checkpoint):
    with pytest.raises(LipsyncError):
        Wav2LipEngine(checkpoint, device="cpu", precision="fp16")
    with pytest.raises(LipsyncError):
        Wav2LipEngine(checkpoint, device="cpu", precision="int8", backend="torch")
    with pytest.raises(LipsyncError):
        Wav2LipEngine(checkpoint, device="cpu", precision="bf16")
    with pytest.raises(LipsyncError):
        Wav2LipEngine(checkpoint, device="cpu", backend="tensorrt")
