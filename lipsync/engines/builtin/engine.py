"""The built-in lip-sync engine: no weights, numpy/OpenCV only, fast on a CPU.

``prepare`` finds the mouth on the still avatar (``mouth.locate_mouth``) and
precomputes the lower-face region, sampling grids, displacement fields,
feathered mask and mouth-interior colours (``mouth.MouthRenderer``).
``render`` turns the speech into a per-frame mouth state (``drive.mouth_track``:
the phoneme timeline when the synthesiser gave one, the audio otherwise) and
draws each frame by warping the lower lip and jaw and painting the opening.

Frames with the same quantised mouth state are drawn once per request (a
cache local to the ``render`` call), so the engine instance itself is never
mutated and can be shared by concurrent requests.

Built with a torch ``device`` (the service passes its CUDA GPU), ``render(...,
on_device=True)`` draws the mouth states there, a batch of new states at once,
and yields torch tensors on it (``device_mouth``: the same frames, a painted
pixel at most 1/255 apart); without one it never imports torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from lipsync.engines.base import PreparedAvatar, batches, check_order
from lipsync.engines.builtin.drive import MouthTrack, mouth_track
from lipsync.engines.builtin.mouth import MouthRenderer, MouthShape, locate_mouth
from lipsync.errors import InvalidInputError
from lipsync.faces.box import FaceBox
from lipsync.faces.landmarks import Landmarks, face_landmarks
from lipsync.media.audio import frame_count
from lipsync.tts.base import Speech

VERSION = "1.1"
BATCH = 32            # frames per yielded batch
FIRST_BATCH = 8       # ... but the first: a stream's first frames sooner
OPEN_LEVELS = 40      # quantisation of ``open`` (about 1 px steps on a 512 px face)
WIDE_LEVELS = 16      # quantisation of ``wide`` over [-1, 1]
CACHE_BYTES = 96 << 20  # per render call
DEVICE_CACHE_BYTES = 1 << 30  # per render call on a device: a 40 s request draws ~200 states


class BuiltinEngine:
    """Audio/phoneme-driven mouth animation of a still photo (see module doc)."""

    name = "builtin"

    def __init__(self, device=None):
        self.device = device  # a torch.device (or its name) for ``render(on_device=True)``, or None

    @property
    def patch_device(self):
        """Where ``render(..., on_device=True)`` leaves its patches (None: NumPy arrays always)."""
        if self.device is None:
            return None
        import torch

        return torch.device(self.device)

    def prepare(self, image: np.ndarray, box: FaceBox, landmarks: Landmarks | None = None) -> PreparedAvatar:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError("the avatar must be a colour (H, W, 3) image", code="invalid_image")
        image = np.ascontiguousarray(image, dtype=np.uint8)
        h, w = image.shape[:2]
        clipped = box.clip(w, h)
        if clipped.width < 16 or clipped.height < 16:
            raise InvalidInputError("the face is too small to animate", code="invalid_image")
        # Without the face mesh (no face for it) the mouth is found from the pixels.
        if landmarks is None:
            landmarks = face_landmarks(image, clipped)
        geometry = locate_mouth(image, clipped, landmarks)
        renderer = MouthRenderer(image, clipped, geometry)
        return PreparedAvatar(image=image, box=box, region=renderer.region,
                              mask=renderer.mask[..., None].copy(), state=renderer)

    def track(self, speech: Speech, fps: int) -> MouthTrack:
        """The per-frame mouth state ``render`` draws (exposed for tests and tools)."""
        return mouth_track(speech, fps, frame_count(len(speech.samples), fps))

    def render(self, avatar: PreparedAvatar, speech: Speech, fps: float,
               crops: Iterator[np.ndarray] | None = None, on_device: bool = False,
               order: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """``Engine.render``: the mouth state of each frame (``track``) drawn, in ``order``.
        ``on_device`` (with ``patch_device``, a photo avatar): the batches are uint8 torch
        tensors drawn on that device."""
        renderer: MouthRenderer = avatar.state
        if not isinstance(renderer, MouthRenderer):
            raise TypeError("avatar was not prepared by the builtin engine")
        track = self.track(speech, fps)
        n = len(track)
        rh, rw = renderer.region.height, renderer.region.width
        cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        max_items = max(8, CACHE_BYTES // max(1, rh * rw * 3))
        qo = np.rint(np.clip(track.open, 0, 1) * OPEN_LEVELS).astype(np.int64)
        qw = np.rint(np.clip(track.wide, -1, 1) * (WIDE_LEVELS / 2)).astype(np.int64)
        qw[qo == 0] = 0  # a shut mouth is the untouched avatar
        check_order(order, n, crops)
        if order is not None:
            qo, qw = qo[order], qw[order]
            n = len(order)
        if crops is not None:
            yield from self._render_frames(renderer, qo, qw, crops)
            return
        if on_device and self.patch_device is not None:
            yield from self._render_on_device(renderer, qo, qw, self.patch_device)
            return
        for start, stop in batches(n, BATCH, first=FIRST_BATCH):
            batch = np.empty((stop - start, rh, rw, 3), np.uint8)
            for i in range(start, stop):
                key = (int(qo[i]), int(qw[i]))
                patch = cache.get(key)
                if patch is None:
                    patch = renderer.render(key[0] / OPEN_LEVELS, key[1] / (WIDE_LEVELS / 2))
                    cache[key] = patch
                    if len(cache) > max_items:
                        cache.popitem(last=False)
                else:
                    cache.move_to_end(key)
                batch[i - start] = patch
            yield batch

    @staticmethod
    def _render_on_device(renderer: MouthRenderer, qo: np.ndarray, qw: np.ndarray, device) -> Iterator:
        """``render`` on ``device``: each batch's new mouth states drawn there at once, every state
        kept (up to DEVICE_CACHE_BYTES) for the request's later frames."""
        import torch

        from lipsync.engines.builtin.device_mouth import DeviceMouth

        mouth = DeviceMouth(renderer, device)
        cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        max_items = max(BATCH, DEVICE_CACHE_BYTES // max(1, renderer.region.height * renderer.region.width * 3))
        for start, stop in batches(len(qo), BATCH, first=FIRST_BATCH):
            keys = list(zip(qo[start:stop].tolist(), qw[start:stop].tolist()))
            new = [key for key in dict.fromkeys(keys) if key not in cache]
            if new:
                drawn = mouth.draw([renderer.state(o / OPEN_LEVELS, w / (WIDE_LEVELS / 2)) for o, w in new])
                cache.update(zip(new, drawn))
            for key in keys:
                cache.move_to_end(key)
            batch = torch.stack([cache[key] for key in keys])
            while len(cache) > max_items:
                cache.popitem(last=False)
            yield batch

    @staticmethod
    def _render_frames(renderer: MouthRenderer, qo: np.ndarray, qw: np.ndarray,
                       crops: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """A video avatar: each frame drawn on its own picture. What a mouth state does (warp
        maps, painted opening) is worked out once per request and state; only the warp of the
        picture and the paint are per frame."""
        shapes: OrderedDict[tuple[int, int], MouthShape | None] = OrderedDict()
        rh, rw = renderer.region.height, renderer.region.width
        max_items = max(8, CACHE_BYTES // max(1, rh * rw * 8))  # two float32 maps per state
        n = len(qo)
        for start, stop in batches(n, BATCH, first=FIRST_BATCH):
            batch = np.empty((stop - start, rh, rw, 3), np.uint8)
            for i in range(start, stop):
                key = (int(qo[i]), int(qw[i]))
                if key in shapes:
                    shapes.move_to_end(key)
                    shape = shapes[key]
                else:
                    shape = shapes[key] = renderer.shape(key[0] / OPEN_LEVELS, key[1] / (WIDE_LEVELS / 2))
                    if len(shapes) > max_items:
                        shapes.popitem(last=False)
                batch[i - start] = renderer.draw(shape, next(crops))
            yield batch

    def describe(self) -> dict:
        device = self.patch_device
        return {"engine": self.name, "checkpoint": None, "version": VERSION,
                "device": device.type if device is not None else "cpu"}
