"""Find the avatar's face once and remember it.

``FaceLocator.locate(image)`` answers, in this order:

1. the manual override box (``FACE_BOX``), clipped to the image;
2. the in-memory cache, then the on-disk cache (``lipsync.faces.cache``), keyed by the
   detector id and the image's pixels;
3. a detection (S3FD when its weights are installed, Haar otherwise), which is
   then stored in both caches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from lipsync.errors import CheckpointError, InvalidInputError, NoFaceError
from lipsync.faces.box import FaceBox
from lipsync.faces.cache import FaceBoxCache

log = logging.getLogger(__name__)

DETECTORS = ("auto", "s3fd", "haar")
NO_FACE_MESSAGE = "no face found in the avatar image"
SECOND_FACE_RATIO = 0.5  # a second face counts when at least this fraction of the largest one's width


class Detector(Protocol):
    """What ``FaceLocator`` needs from a detector (``S3FDDetector``, ``HaarDetector``).

    ``name``: short name for ``describe()``; ``cache_id``: changes whenever
    the boxes it would return change (weights, calibration, settings);
    ``detect(image_bgr)``: faces as ``(FaceBox, score)``, preferred first,
    boxes in S3FD framing in pixels of the image; empty when there is none.
    """

    name: str
    cache_id: str

    def detect(self, image_bgr: np.ndarray) -> list[tuple[FaceBox, float]]: ...


class FaceLocator:
    """The avatar's face box, from an override, a cache or a detector.

    Parameters:
        detector: ``"auto"`` (S3FD when ``s3fd_path`` exists, else Haar),
            ``"s3fd"`` (``CheckpointError`` now if the weights are missing or
            invalid), ``"haar"``, or a ready detector object (see
            ``Detector``).
        s3fd_path: the S3FD weights (``s3fd.pth``, a.k.a.
            ``s3fd-619a316812.pth``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``, for S3FD.
        cache_dir: folder for the disk cache (``faces/`` inside it); ``None``
            keeps results in memory only.
        box_override: ``(x1, y1, x2, y2)`` pixels (half-open) or a
            ``FaceBox``; when given no detector is built and every image gets
            this box, clipped to it.
        memory_entries: most boxes kept in memory (least recently used go).

    ``locate`` is thread-safe: one lock covers cache lookups, detection and
    stores, so concurrent calls for a new image detect once. The detector
    (S3FD model included) is shared and never mutated per call.

    ``stats`` counts ``detections``, ``memory_hits`` and ``disk_hits``.
    """

    def __init__(
        self,
        detector: str | Detector = "auto",
        s3fd_path: str | os.PathLike = "checkpoints/s3fd.pth",
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = ".cache",
        box_override: Sequence[int] | FaceBox | None = None,
        *,
        memory_entries: int = 256,
    ):
        self.requested = detector if isinstance(detector, str) else getattr(detector, "name", type(detector).__name__)
        self.s3fd_path = Path(s3fd_path)
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.override = _validate_override(box_override) if box_override is not None else None
        self._cache = FaceBoxCache(self.cache_dir, memory_entries)
        self._lock = threading.Lock()
        self.stats = {"detections": 0, "memory_hits": 0, "disk_hits": 0}
        if self.override is not None:
            self.detector = None
        elif isinstance(detector, str):
            self.detector = _build_detector(detector, self.s3fd_path, device)
        else:
            for attr in ("detect", "cache_id", "name"):
                if not hasattr(detector, attr):
                    raise TypeError(f"detector object lacks {attr!r}")
            self.detector = detector

    # ------------------------------------------------------------ public

    def locate(self, image_bgr: np.ndarray) -> FaceBox:
        """The face box of ``image_bgr`` in pixels of that image.

        ``image_bgr``: uint8 ``(H, W, 3)`` BGR as OpenCV reads it, or
        ``(H, W, 4)`` BGRA, or grey ``(H, W)`` / ``(H, W, 1)``. Returns a
        half-open ``FaceBox`` inside the image, S3FD framing (roughly forehead
        to chin, cheek to cheek), with no padding added.

        Raises ``NoFaceError`` (422, ``no_face``) when no face is found,
        ``InvalidInputError`` for an unusable array or an override box that
        lies outside the image.
        """
        _validate_image(image_bgr)
        h, w = image_bgr.shape[:2]
        if self.override is not None:
            box = self.override.clip(w, h)
            if box.width <= 0 or box.height <= 0:
                raise InvalidInputError(
                    f"the face box override {self.override.as_list()} lies outside the "
                    f"{w}x{h} avatar image; set FACE_BOX to x1,y1,x2,y2 inside it"
                )
            return box

        key = self.cache_key(image_bgr)
        with self._lock:
            box = self._cache.from_memory(key)
            if box is not None:
                self.stats["memory_hits"] += 1
                return box
            box = self._cache.from_disk(key, self.detector.cache_id, w, h)
            if box is not None:
                self.stats["disk_hits"] += 1
                self._cache.remember(key, box)
                return box
            found = self._detect(image_bgr, key)
            if not found:
                raise NoFaceError(NO_FACE_MESSAGE)
            return found[0]

    def faces(self, image_bgr: np.ndarray) -> list[FaceBox]:
        """Every face the detector sees in ``image_bgr`` (the override box alone when one is
        set), preferred first; detections less than ``SECOND_FACE_RATIO`` of the largest one's
        width are left out (a face in a poster behind the presenter, a false detection in a
        pattern). Always detects (for checking an upload once); the preferred face is then
        cached, so ``locate`` on the same image does not detect again."""
        _validate_image(image_bgr)
        h, w = image_bgr.shape[:2]
        if self.override is not None:
            return [self.override.clip(w, h)]
        with self._lock:
            found = self._detect(image_bgr, self.cache_key(image_bgr))
        if not found:
            return []
        widest = max(box.width for box in found)
        return [box for box in found if box.width >= SECOND_FACE_RATIO * widest]

    def _detect(self, image_bgr: np.ndarray, key: str) -> list[FaceBox]:
        """The detector's faces inside the image, preferred first; the preferred one is stored
        in both caches under ``key``. Call with the lock held."""
        h, w = image_bgr.shape[:2]
        self.stats["detections"] += 1
        found = [(box.clip(w, h), float(score)) for box, score in self.detector.detect(image_bgr)]
        found = [(box, score) for box, score in found if box.width > 0 and box.height > 0]
        if found:
            box, score = found[0]
            self._cache.remember(key, box)
            self._cache.to_disk(key, box, {"score": score, "detector": self.detector.name,
                                           "detector_id": self.detector.cache_id, "image_size": [w, h]})
        return [box for box, _ in found]

    def cache_key(self, image_bgr: np.ndarray) -> str:
        """SHA-256 hex of the detector id, the image's shape, dtype and pixels."""
        digest = hashlib.sha256()
        digest.update(str(self.detector.cache_id if self.detector is not None else "manual").encode())
        digest.update(f"|{image_bgr.shape}|{image_bgr.dtype.str}|".encode())
        digest.update(np.ascontiguousarray(image_bgr).data)
        return digest.hexdigest()

    def cache_path(self, image_bgr: np.ndarray) -> Path | None:
        """Where the disk cache keeps this image's box (``None`` without a cache dir)."""
        return self._cache.path(self.cache_key(image_bgr))

    def describe(self) -> dict:
        """``{"detector": "s3fd" | "haar" | "manual", ...details}`` for status pages."""
        if self.override is not None:
            return {"detector": "manual", "box": self.override.as_list()}
        info = {"detector": self.detector.name, "requested": self.requested,
                "cache_dir": str(self.cache_dir) if self.cache_dir is not None else None}
        extra = getattr(self.detector, "describe", None)
        if callable(extra):
            info.update({k: v for k, v in extra().items() if k != "detector"})
        return info


def _build_detector(kind: str, s3fd_path: Path, device: str) -> Detector:
    if kind not in DETECTORS:
        raise ValueError(f"face detector must be one of {', '.join(DETECTORS)}, not {kind!r}")
    if kind == "s3fd" or (kind == "auto" and s3fd_path.is_file()):
        if not s3fd_path.is_file():
            raise CheckpointError(
                f"FACE_DETECTOR=s3fd but the S3FD weights are not at {s3fd_path}: put s3fd.pth "
                "(s3fd-619a316812.pth) there, set S3FD_PATH, or use FACE_DETECTOR=haar"
            )
        from lipsync.faces.s3fd import S3FDDetector  # torch only when S3FD is used

        return S3FDDetector(s3fd_path, device)
    from lipsync.faces.haar import HaarDetector

    return HaarDetector()


def _validate_override(box: Sequence[int] | FaceBox) -> FaceBox:
    values = box.as_list() if isinstance(box, FaceBox) else list(box)
    if len(values) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise InvalidInputError(f"the face box override must be four whole numbers x1,y1,x2,y2, not {box!r}")
    out = FaceBox(*(int(v) for v in values))
    if out.x1 >= out.x2 or out.y1 >= out.y2:
        raise InvalidInputError(f"the face box override {out.as_list()} needs x1 < x2 and y1 < y2")
    return out


def _validate_image(image) -> None:
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"the avatar image must be a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidInputError(f"the avatar image must be 8-bit (uint8), not {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise InvalidInputError(f"the avatar image must be HxW, HxWx3 or HxWx4, not shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidInputError("the avatar image is empty")
