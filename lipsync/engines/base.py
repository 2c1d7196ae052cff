"""The interface both lip-sync engines implement.

An engine never touches the whole frame: ``prepare`` picks the region of the
avatar it will redraw (once per avatar) and ``render`` yields that region for
every video frame. Pasting the region back (``lipsync.media.video.composite``) and
encoding are shared by all engines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lipsync.faces.box import FaceBox, Rect
from lipsync.tts.base import Speech

# The rectangle of the avatar an engine redraws, in pixels, half-open (x2, y2 excluded).
Region = Rect


@dataclass(frozen=True)
class PreparedAvatar:
    """Everything an engine computes once per avatar.

    image:  (H, W, 3) uint8 BGR avatar at output size; never modified.
    box:    the face box on ``image``.
    region: the rectangle ``render`` redraws.
    mask:   (region.height, region.width, 1) float32 in [0, 1]: how much of
            the rendered patch replaces the avatar at each pixel (feathered
            edges, so no seam shows).
    state:  engine-private data (reference crop, mouth geometry, ...).
    idle:   the avatar's idle-motion rig (``lipsync.motion.idle.IdleRig``), added by the
            service; None: the face stays still apart from the mouth.
    video:  a video avatar's footage (``lipsync.avatars.video.VideoBase``); ``image`` is
            then its reference frame, the one the engine prepared. None for a photo.
    """

    image: np.ndarray
    box: FaceBox
    region: Region
    mask: np.ndarray
    state: Any = None
    idle: Any = None
    video: Any = None


class Engine(Protocol):
    """A lip-sync engine shared by all requests; must not mutate itself per request."""

    name: str

    def prepare(self, image: np.ndarray, box: FaceBox, landmarks=None) -> PreparedAvatar:
        """Precompute per-avatar data. ``image``: (H, W, 3) uint8 BGR; ``landmarks``: the face
        mesh of ``box`` (``lipsync.faces.landmarks``) when the caller has it, else the engine
        looks for it."""
        ...

    #: The torch device ``render(..., on_device=True)`` leaves its batches on as uint8 tensors
    #: (the GPU frames are made on), or None: its batches are always NumPy arrays.
    patch_device = None

    def render(self, avatar: PreparedAvatar, speech: Speech, fps: float,
               crops: Iterator[np.ndarray] | None = None, on_device: bool = False,
               order: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Yield the redrawn region for each video frame, in batches.

        Each item is (n, region.height, region.width, 3) uint8 BGR; together
        they hold exactly ``lipsync.media.audio.frame_count(len(speech.samples), fps)``
        frames, or with ``order`` the frames it names (indices), in its order (as an MP4
        writer's ``frame_order`` gives it; None: all, in time order). ``crops`` (video
        avatars, time order only): the region of each frame's own picture,
        (region.height, region.width, 3) uint8 BGR with the face where it is on the
        prepared frame, one per frame in order; the engine draws on those instead of
        on ``avatar.image``, and reads one only when it renders that frame. ``on_device``
        (a photo, an engine whose ``patch_device`` is not None): the batches are uint8 torch
        tensors on that device, the same frames.
        """
        ...

    def describe(self) -> dict:
        """What health reports: ``{"engine", "checkpoint", "version", "device"}``."""
        ...


def check_order(order: np.ndarray | None, count: int, crops) -> None:
    """Raise ``ValueError`` unless ``order`` (``Engine.render``'s) is None or names frames of
    the ``count`` there are, each at most once, and comes without ``crops``."""
    if order is None:
        return
    if crops is not None:
        raise ValueError("a video avatar's frames are drawn in time order")
    if len(order) and (np.min(order) < 0 or np.max(order) >= count or len(np.unique(order)) != len(order)):
        raise ValueError(f"order must name frames of the {count} there are, each at most once")


def batches(count: int, size: int, first: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive batches covering ``count`` frames: the first of at most
    ``first`` frames, the others of ``size``. A small first batch puts a request's first frames
    in front of the encoder sooner (a streamed request's first fragment), at the cost of one more
    engine call."""
    start = 0
    while start < count:
        stop = min(count, start + (min(first, size) if start == 0 else size))
        yield start, stop
        start = stop
