"""The built-in engine's mouth states drawn by torch (``device_mouth``) equal the CPU path's.

The same torch code runs on the GPU in production; here it runs on torch's CPU device (and on
CUDA where there is one: ``bench/gpu_bench.sh`` runs this file there). Only NumPy, OpenCV and
torch are needed, so this file runs on the GPU machine as it is.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from lipsync.engines.builtin.device_mouth import DeviceMouth
from lipsync.engines.builtin.engine import BuiltinEngine
from lipsync.faces.box import FaceBox
from lipsync.media import video
from lipsync.media.audio import load_audio
from lipsync.tts.base import Speech
from tests.conftest import fixture_path

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# OpenCV 4 (the pinned one) is the reference; OpenCV 5 (the GPU machine's image) samples
# differently, so there the GPU is compared with the same code on torch's CPU device.
OPENCV_4 = cv2.__version__.startswith("4.")
# exp rounds differently in torch and NumPy (device_mouth): a painted pixel may be one
# level apart; more than this share of them would be a different formula, not rounding.
MAX_SHARE_APART = 1e-4


@pytest.fixture(scope="module")
def avatar():
    """avatar.jpg at 720 lines, prepared by the built-in engine."""
    image = cv2.imread(str(fixture_path("avatar.jpg")))
    scale = 720 / image.shape[0]
    image = video.fit_to_height(image, 720)
    box = FaceBox(420, 137, 885, 602).scaled(scale).clip(image.shape[1], image.shape[0])
    return BuiltinEngine().prepare(image, box)


def _reference(device: str):
    """Who draws the expected frames: the CPU path, or torch's CPU device where OpenCV is not 4.x."""
    if OPENCV_4:
        return None
    if device == "cpu":
        pytest.skip(f"OpenCV {cv2.__version__} is not the pinned 4.x: its remap is not the reference")
    return "cpu"


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    apart = np.abs(got.astype(np.int16) - want)
    share = float((apart > 0).mean())
    assert int(apart.max()) <= 1 and share <= MAX_SHARE_APART, \
        f"max {int(apart.max())} levels apart, {share:.2e} of the values"


@pytest.mark.parametrize("device", DEVICES)
def test_every_kind_of_mouth_state_is_drawn_as_on_the_cpu(avatar, device):
    """Shut, barely parted, half and wide open; spread, rounded and neither; drawn in one batch."""
    reference = _reference(device)
    renderer = avatar.state
    states = [(0.0, 0.0), (0.02, 0.0), (0.3, 0.0), (1.0, 0.0), (0.5, 1.0), (0.5, -1.0), (0.9, 0.5),
              (0.15, -0.25), (0.0, 0.75)]
    got = DeviceMouth(renderer, device).draw([renderer.state(o, w) for o, w in states]).cpu().numpy()
    if reference is None:
        want = np.stack([renderer.render(o, w) for o, w in states])
    else:
        want = DeviceMouth(renderer, reference).draw([renderer.state(o, w) for o, w in states]).numpy()
    assert got.shape == want.shape == (len(states), renderer.region.height, renderer.region.width, 3)
    _assert_close(got, want)
    # not the same picture over and over: the states differ from the shut mouth
    assert all(np.abs(got[i].astype(np.int16) - got[0]).max() > 20 for i in range(2, len(states)))


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_drawn_on_the_device_is_the_cpu_engines_frames(avatar, device):
    """Real speech: every frame of ``render(on_device=True)`` against ``render``, in time order
    and in a segmented writer's order; batches are uint8 tensors on the device."""
    reference = _reference(device)
    speech = Speech(load_audio(str(fixture_path("kennedy_speech_16k.wav"))))
    engine = BuiltinEngine(device=device)
    assert engine.patch_device == torch.device(device) and engine.describe()["device"] == torch.device(device).type
    n = len(engine.track(speech, 25))
    order = np.concatenate([np.arange(start, n, 3) for start in range(3)])
    for frame_order in (None, order):
        batches = list(engine.render(avatar, speech, 25, on_device=True, order=frame_order))
        assert all(isinstance(b, torch.Tensor) and b.device.type == device and b.dtype == torch.uint8
                   for b in batches)
        got = torch.cat(batches).cpu().numpy()
        source = BuiltinEngine(device=reference) if reference else BuiltinEngine()
        want = np.concatenate([b.cpu().numpy() if isinstance(b, torch.Tensor) else b
                               for b in source.render(avatar, speech, 25, on_device=True, order=frame_order)])
        assert len(got) == len(want) == (n if frame_order is None else len(order))
        _assert_close(got, want)
