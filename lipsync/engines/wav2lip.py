"""The Wav2Lip lip-sync engine: redraws the lower face of a still avatar.

One engine is built per process and shared by all requests: the model is
loaded once, never changed afterwards, and every call into it holds a lock,
so concurrent ``render`` calls give exactly what serial ones give.

Per avatar (``prepare``): the face box is padded (spec: bottom + 10 px,
clipped), the crop resized to 96x96, the model's 6-channel input built and
the face encoder run once; its features are reused for every frame. Per
request (``render``): 16 kHz speech -> mel -> one 16-column window per video
frame -> batches through the audio encoder and decoder -> 96x96 BGR faces
resized to the region.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import torch

from lipsync import audio
from lipsync.engines.base import PreparedAvatar, Region
from lipsync.errors import InvalidInputError, LipsyncError, NoFaceError
from lipsync.faces.box import FaceBox
from lipsync.tts.base import Speech
from lipsync.wav2lip import FACE_SIZE, Wav2Lip, load_checkpoint

# Box padding before cropping (pixels), as the published models expect.
PAD_TOP, PAD_BOTTOM, PAD_LEFT, PAD_RIGHT = 0, 10, 0, 0

# The blend mask, as fractions of the region: fully generated from
# MASK_TOP_FULL of the height down to MASK_BOTTOM_FEATHER above the bottom
# edge, fading to nothing at MASK_TOP_ZERO and at the bottom edge;
# horizontally fading over MASK_SIDE_FEATHER of the width at each side. The
# upper face stays the avatar's own pixels (sharper than a 96 px upscale).
MASK_TOP_ZERO = 0.46
MASK_TOP_FULL = 0.64
MASK_BOTTOM_FEATHER = 0.07
MASK_SIDE_FEATHER = 0.16


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def feather_mask(height: int, width: int) -> np.ndarray:
    """(height, width, 1) float32 blend weight: 1 over mouth and chin, 0 on every border.

    Separable product of smoothstep ramps (continuous slope, so no visible
    edge): rows fade in between MASK_TOP_ZERO and MASK_TOP_FULL of the height
    and out over the last MASK_BOTTOM_FEATHER; columns fade over
    MASK_SIDE_FEATHER at each side. The outermost pixel rows and columns are
    exactly 0.
    """
    y = np.arange(height, dtype=np.float64)
    x = np.arange(width, dtype=np.float64)
    top = _smoothstep((y - MASK_TOP_ZERO * (height - 1)) / max(1.0, (MASK_TOP_FULL - MASK_TOP_ZERO) * height))
    bottom = _smoothstep((height - 1 - y) / max(1.0, MASK_BOTTOM_FEATHER * height))
    side_px = max(1.0, MASK_SIDE_FEATHER * width)
    sides = _smoothstep(x / side_px) * _smoothstep((width - 1 - x) / side_px)
    mask = (top * bottom)[:, None] * sides[None, :]
    return mask[:, :, None].astype(np.float32)


@dataclass(frozen=True)
class _Wav2LipState:
    """Per-avatar data: the model input and the face encoder's features for it."""

    faces: torch.Tensor                      # (1, 6, 96, 96) on the engine's device/dtype
    features: tuple[torch.Tensor, ...] | None  # encode_faces(faces); None for a scripted model
    crop: np.ndarray                         # (96, 96, 3) uint8 BGR reference crop


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LipsyncError("device 'cuda' was requested but no CUDA GPU is available (use 'auto' or 'cpu')",
                               code="device_unavailable")
        return torch.device(device)
    raise LipsyncError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'", code="invalid_settings")


class Wav2LipEngine:
    """``lipsync.engines.base.Engine`` backed by a Wav2Lip checkpoint.

    ``model_path``: any layout ``lipsync.wav2lip.load_model`` reads.
    ``device``: "auto" (CUDA when available), "cpu" or "cuda".
    ``batch_size``: video frames per model call (memory grows linearly; about
    8 MB per frame on CPU in fp32).
    On CUDA the model runs in fp16 with channels-last tensors; on CPU in fp32.
    Raises ``CheckpointError`` when the checkpoint cannot be used.
    """

    name = "wav2lip"

    def __init__(self, model_path: str, device: str = "auto", batch_size: int = 64):
        if int(batch_size) < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = int(batch_size)
        self.device = _resolve_device(device)
        loaded = load_checkpoint(model_path, "cpu")
        model = loaded.model
        self._info = loaded.info
        self._dtype = torch.float32
        self._memory_format = torch.contiguous_format
        if self.device.type == "cuda":
            model = model.to(self.device).half()
            self._dtype = torch.float16
            if isinstance(model, Wav2Lip):
                model = model.to(memory_format=torch.channels_last)
                self._memory_format = torch.channels_last
        self._model = model.eval()
        self._eager = isinstance(self._model, Wav2Lip)
        self._lock = threading.Lock()

    # -- Engine --------------------------------------------------------------

    def describe(self) -> dict:
        """``{"engine": "wav2lip", "checkpoint": file name, "version": "<layout>-<sha256 prefix>", "device"}``."""
        return {
            "engine": self.name,
            "checkpoint": self._info["name"],
            "version": f"{self._info['layout']}-{self._info['sha256']}",
            "device": self.device.type,
        }

    def prepare(self, image: np.ndarray, box: FaceBox) -> PreparedAvatar:
        """Crop, model input and face features for ``image`` (H, W, 3) uint8 BGR.

        The region is ``box`` padded by the spec's (top 0, bottom 10, left 0,
        right 0) pixels and clipped to the image. Raises ``InvalidInputError``
        for a non-BGR image and ``NoFaceError`` when the box holds no pixels.
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = getattr(image, "shape", None)
            raise InvalidInputError(f"the avatar must be an (H, W, 3) uint8 BGR image, got {shape}")
        h, w = image.shape[:2]
        padded = FaceBox(box.x1 - PAD_LEFT, box.y1 - PAD_TOP, box.x2 + PAD_RIGHT, box.y2 + PAD_BOTTOM).clip(w, h)
        if padded.width < 2 or padded.height < 2:
            raise NoFaceError(f"the face box {box.as_list()} lies outside the {w}x{h} avatar")
        region = Region(padded.x1, padded.y1, padded.x2, padded.y2)
        crop = image[region.y1:region.y2, region.x1:region.x2]
        # INTER_AREA when shrinking: a large face then looks like the
        # low-resolution faces the model was trained on instead of aliasing.
        shrink = crop.shape[0] > FACE_SIZE and crop.shape[1] > FACE_SIZE
        face = cv2.resize(crop, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        masked = face.copy()
        masked[FACE_SIZE // 2:] = 0
        six = np.concatenate([masked, face], axis=2).astype(np.float32) / 255.0  # (96, 96, 6)
        faces = torch.from_numpy(six.transpose(2, 0, 1)[None].copy())
        faces = faces.to(self.device, self._dtype).contiguous(memory_format=self._memory_format)
        features = None
        if self._eager:
            with self._lock, torch.inference_mode():
                features = tuple(self._model.encode_faces(faces))
        state = _Wav2LipState(faces=faces, features=features, crop=face)
        return PreparedAvatar(image=image, box=box, region=region,
                              mask=feather_mask(region.height, region.width), state=state)

    def render(self, avatar: PreparedAvatar, speech: Speech, fps: int) -> Iterator[np.ndarray]:
        """Yield (n, region.height, region.width, 3) uint8 BGR batches, one frame per mel window.

        Exactly ``audio.frame_count(len(speech.samples), fps)`` frames in all.
        ``speech`` must be 16 kHz; raises ``InvalidInputError`` otherwise.
        """
        state = avatar.state
        if not isinstance(state, _Wav2LipState):
            raise ValueError("this avatar was not prepared by a Wav2LipEngine")
        if speech.sample_rate != audio.SAMPLE_RATE:
            raise InvalidInputError(f"speech must be {audio.SAMPLE_RATE} Hz, got {speech.sample_rate} Hz")
        if not fps or fps <= 0:
            raise InvalidInputError(f"fps must be positive, got {fps}")
        samples = np.asarray(speech.samples, dtype=np.float32).reshape(-1)
        windows = audio.mel_windows(audio.melspectrogram(samples), fps)  # (N, 80, 16)
        expected = audio.frame_count(len(samples), fps)
        if len(windows) != expected:  # both come from the same mel length; guard the contract
            raise RuntimeError(f"mel windows ({len(windows)}) disagree with frame_count ({expected})")
        size = (avatar.region.width, avatar.region.height)
        for start in range(0, len(windows), self.batch_size):
            mel = torch.from_numpy(windows[start:start + self.batch_size]).unsqueeze(1)  # (b, 1, 80, 16)
            faces96 = self._predict(mel, state)  # (b, 96, 96, 3) float32 in [0, 255]
            out = np.empty((len(faces96), size[1], size[0], 3), dtype=np.uint8)
            for i, face in enumerate(faces96):
                resized = cv2.resize(face, size, interpolation=cv2.INTER_CUBIC)
                np.clip(resized, 0, 255, out=resized)
                np.rint(resized, out=resized)
                out[i] = resized
            yield out

    # -- internals -----------------------------------------------------------

    def _predict(self, mel: torch.Tensor, state: _Wav2LipState) -> np.ndarray:
        """(b, 1, 80, 16) mel windows -> (b, 96, 96, 3) float32 BGR in [0, 255]."""
        mel = mel.to(self.device, self._dtype).contiguous(memory_format=self._memory_format)
        with self._lock, torch.inference_mode():
            if state.features is not None:
                pred = self._model.decode(mel, state.features)
            else:
                pred = self._model(mel, state.faces.expand(mel.size(0), -1, -1, -1))
            pred = (pred.float() * 255.0).permute(0, 2, 3, 1).contiguous().cpu()
        return pred.numpy()
