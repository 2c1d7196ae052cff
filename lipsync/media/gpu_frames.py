"""Whole frames made on the GPU: patches pasted, idle motion drawn, I420 planes out.

What ``lipsync.media.video.composite``, ``lipsync.motion.idle.apply_idle`` and OpenCV's
BGR -> I420 conversion do per frame on the CPU, done here on a batch of frames at once in
torch, on any device (a CUDA GPU in production; the CPU in tests, which compare the two paths),
with the same arithmetic, so the frames are the same:

* the blend ``patch * mask + (base * (1 - mask) + 0.5)`` in float32, truncated, as ``composite``;
* the idle remap's maps added up in the same order as ``apply_idle``'s ``cv2.scaleAdd``s (each
  a fused multiply-add rounded to float32: ``addcmul`` of float32 maps and float64 fields, which
  torch computes in float64, where the product is exact, and rounds once to float32 as it
  stores; a field only where it is not zero, and not at all where no frame of the chunk uses
  it, as ``apply_idle`` skips it: adding 0 changes nothing), then sampled as
  ``cv2.remap(INTER_LINEAR, BORDER_REPLICATE)`` samples 8-bit images (``torch_image.remap_linear``:
  coordinates rounded to 1/32 pixel, integer weights, ``(sum + 512) >> 10``);
* BT.601 limited-range I420 with OpenCV's integer coefficients, chroma from the top-left pixel
  of each 2x2 block (as ``cv2.cvtColor(COLOR_BGR2YUV_I420)``).

Only the finished I420 planes cross to the host (half the bytes of BGR), one copy per batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lipsync.engines.base import PreparedAvatar
from lipsync.media.torch_image import i420, remap_linear, upload
from lipsync.media.video import _mask_box
from lipsync.motion.idle import IdleRig, IdleTrack, motion_terms

# Frames computed at once: at least CHUNK (the CPU, a small GPU), up to MAX_CHUNK where a quarter
# of the GPU's free memory holds them (the float64 maps and int32 taps: below BYTES_PER_PIXEL a
# frame pixel). The request's thread spends ~6 ms launching a chunk's ~100 kernels, whatever its
# size: 64 frames a chunk instead of 16 cut that from 0.39 to 0.11 s in a 40 s request at
# 1084x1246 on the H200 (6.3 GiB at its peak).
CHUNK, MAX_CHUNK = 16, 64
BYTES_PER_PIXEL = 256

def _ready(host: torch.Tensor, done) -> Iterator[np.ndarray]:
    if done is not None:
        done.synchronize()
    yield from host.numpy()


class GpuFrames:
    """One request's frames on ``device``: ``frames(patches, first, track)`` composites a batch
    of engine patches into the avatar, draws the idle motion (``rig``, when given, moved by
    ``track``) and returns the I420 frames on the host, the same as the CPU path's
    ``video.composite`` -> ``apply_idle`` -> ``cv2.cvtColor(COLOR_BGR2YUV_I420)``."""

    def __init__(self, avatar: PreparedAvatar, device: torch.device | str, rig: IdleRig | None = None):
        self.device = torch.device(device)
        self.avatar = avatar
        self.rig = rig
        # Every constant goes up through pinned memory, without waiting: a copy from pageable
        # memory waits for all the GPU's queued work, the other requests' frames included.
        self.image = upload(avatar.image, self.device)
        self._pin = self.device.type == "cuda"
        self.chunk = CHUNK
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            per_frame = BYTES_PER_PIXEL * avatar.image.shape[0] * avatar.image.shape[1]
            self.chunk = int(min(MAX_CHUNK, max(CHUNK, free // 4 // per_frame)))
        self._box = _mask_box(avatar.mask)
        if self._box is not None:
            y1, y2, x1, x2 = self._box
            r = avatar.region
            mask = np.ascontiguousarray(avatar.mask[y1:y2, x1:x2], dtype=np.float32)
            base = avatar.image[r.y1 + y1:r.y1 + y2, r.x1 + x1:r.x1 + x2].astype(np.float32)
            self._mask = upload(mask, self.device)
            self._keep = upload(base * (1.0 - mask) + 0.5, self.device)  # as composite's
        if self.rig is not None:
            rig = self.rig
            xx, yy = rig.grid
            hx, hy = rig.head_grid
            self._grid = [upload(a, self.device).to(torch.float32) for a in (xx, yy)]
            self._fields = [upload(a, self.device).to(torch.float64) for a in (hx, hy, rig.head)]
            # The fields of map_y's last three terms, each only inside its bounding box (None: all 0).
            self._extra = [self._nonzero(field) for field in (rig.chest, rig.blink_field, rig.brow_field)]

    def frames(self, patches: np.ndarray | torch.Tensor, index: int | np.ndarray = 0,
               track: IdleTrack | None = None) -> Iterator[np.ndarray]:
        """Yield the I420 frames, (H * 3 // 2, W) uint8 arrays the caller may keep, of ``patches``
        ((n, region.height, region.width, 3) uint8 BGR, on any device): frames ``index`` ..
        ``index + n - 1`` of ``track``, or the n frames of ``track`` an array ``index`` names
        (None: no idle motion)."""
        yield from self.ready(self.launch(patches, index, track))

    def launch(self, patches: np.ndarray | torch.Tensor, index: int | np.ndarray = 0,
               track: IdleTrack | None = None) -> list[tuple[torch.Tensor, torch.cuda.Event | None]]:
        """``frames`` in two halves: queue the work on the device and return at once, with the
        frames' pinned host buffers, chunk by chunk, and the event after which each holds them
        (None on the CPU); ``ready`` waits and yields the frames. A caller that queues its next
        batch before taking this one's frames keeps the GPU busy while it hands them on."""
        patches = upload(torch.as_tensor(patches), self.device)
        n = len(patches)
        numbers = np.arange(index, index + n) if np.isscalar(index) else np.asarray(index)
        # The idle motion's terms of every frame, uploaded once: a copy from pageable host memory
        # would wait for the GPU to finish all queued work, chunk after chunk.
        motion = self._motion(numbers, track) if self.rig is not None and track is not None else None
        chunks = []
        for start in range(0, n, self.chunk):
            end = min(n, start + self.chunk)
            planes = self._i420(patches[start:end], None if motion is None else (
                motion[0][start:end], motion[1][start:end], motion[2][start:end].any(axis=0)))
            # Pinned host memory (torch caches and reuses it once the frames are encoded): the copy
            # runs while the GPU goes on with the next chunk.
            host = torch.empty(planes.shape, dtype=torch.uint8, pin_memory=self._pin)
            host.copy_(planes, non_blocking=self._pin)
            done = torch.cuda.Event() if self._pin else None
            if done is not None:
                done.record()
            chunks.append((host, done))
        return chunks

    @staticmethod
    def ready(chunks: list[tuple[torch.Tensor, torch.cuda.Event | None]]) -> Iterator[np.ndarray]:
        """The frames of ``launch``'s chunks, each chunk once the device has copied it."""
        for host, done in chunks:
            yield from _ready(host, done)

    def _motion(self, numbers: np.ndarray, track: IdleTrack) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Frames ``numbers`` of ``track``: their terms (n, 7, 1, 1) float64 as ``cv2.scaleAdd``
        takes them (float32 values), (n,) bool: does the frame move at all (one upload), and on
        the host (n, 7) bool: which terms are not 0."""
        terms = np.array([motion_terms(self.rig, track, int(i)) for i in numbers], np.float64).reshape(-1, 7)
        # cv2.scaleAdd takes its factor as float32
        packed = np.concatenate([terms.astype(np.float32).astype(np.float64), terms.any(axis=1, keepdims=True)], 1)
        uploaded = upload(packed, self.device)
        return uploaded[:, :7, None, None], uploaded[:, 7] != 0, terms != 0

    def _nonzero(self, field: np.ndarray) -> tuple[tuple[int, int, int, int], torch.Tensor] | None:
        """``field``'s bounding box of non-zero values (y1, y2, x1, x2) and the field inside it,
        float64 on the device; None when it is 0 everywhere."""
        box = _mask_box(np.abs(field))
        if box is None:
            return None
        y1, y2, x1, x2 = box
        return (y1, y2, x1, x2), upload(field[y1:y2, x1:x2], self.device).to(torch.float64)

    def _i420(self, patches: torch.Tensor, motion: tuple | None) -> torch.Tensor:
        n = len(patches)
        frames = self.image.unsqueeze(0).repeat(n, 1, 1, 1)
        if self._box is not None:
            y1, y2, x1, x2 = self._box
            r = self.avatar.region
            work = patches[:, y1:y2, x1:x2].to(torch.float32) * self._mask  # two roundings, as numpy's
            work = work + self._keep
            frames[:, r.y1 + y1:r.y1 + y2, r.x1 + x1:r.x1 + x2] = work.clamp_(0, 255).to(torch.uint8)
        if motion is not None:
            self._idle(frames, *motion)
        return i420(frames)

    def _idle(self, frames: torch.Tensor, k: torch.Tensor, moving: torch.Tensor, used: np.ndarray) -> None:
        """``apply_idle`` on each of ``frames`` in place, moved by ``k`` (``_motion``'s terms of
        each frame) where ``moving``; ``used`` (7,) bool: which terms any of the frames has."""
        n = len(frames)
        a, b, ex, ey, *extra = k.unbind(1)
        xx, yy = self._grid
        hx, hy, head = self._fields
        # Each addcmul: float32(acc + field * factor), the product exact in float64, one rounding
        # (cv2.scaleAdd's fused multiply-add), computed as it is stored into the float32 map.
        map_x = torch.addcmul(xx, hx, a, out=torch.empty((n, *xx.shape), dtype=torch.float32, device=self.device))
        map_x.addcmul_(hy, b).addcmul_(head, ex)
        map_y = torch.addcmul(yy, hy, a, out=torch.empty_like(map_x))
        map_y.addcmul_(hx, -b).addcmul_(head, ey)
        for nonzero, factor, in_use in zip(self._extra, extra, used[4:]):
            if nonzero is not None and in_use:
                (y1, y2, x1, x2), field = nonzero
                map_y[:, y1:y2, x1:x2].addcmul_(field, factor)
        r = self.rig.region
        region = frames[:, r.y1:r.y2, r.x1:r.x2]
        moved = remap_linear(region.contiguous(), map_x, map_y)
        region.copy_(torch.where(moving[:, None, None, None], moved, region))
