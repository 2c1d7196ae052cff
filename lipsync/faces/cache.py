"""Find the avatar's face once and remember it.

``FaceLocator.locate(image)`` answers, in this order:

1. the manual override box (``FACE_BOX``), clipped to the image;
2. the in-memory cache, then the on-disk cache
   ``<cache_dir>/faces/<key>.json`` where ``key`` is the SHA-256 of the
   detector id and the image's pixels (shape, dtype and bytes), so a changed
   image or a different detector/calibration never reuses a stale box;
3. a detection (S3FD when its weights are installed, Haar otherwise), which is
   then stored in both caches (the JSON file is written to a temporary file
   and moved into place with ``os.replace``, so readers never see half a file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from lipsync.errors import CheckpointError, InvalidInputError, NoFaceError
from lipsync.faces.box import FaceBox

log = logging.getLogger(__name__)

DETECTORS = ("auto", "s3fd", "haar")
NO_FACE_MESSAGE = "no face found in the avatar image"


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
        self._memory: OrderedDict[str, FaceBox] = OrderedDict()
        self._memory_entries = max(1, int(memory_entries))
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

    @classmethod
    def from_settings(cls, settings) -> "FaceLocator":
        """A locator configured from ``lipsync.settings.Settings``."""
        return cls(
            detector=settings.face_detector,
            s3fd_path=settings.s3fd_path,
            device=settings.device,
            cache_dir=settings.cache_dir,
            box_override=settings.face_box,
        )

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
            box = self._memory.get(key)
            if box is not None:
                self._memory.move_to_end(key)
                self.stats["memory_hits"] += 1
                return box
            box = self._read_disk(key, w, h)
            if box is not None:
                self.stats["disk_hits"] += 1
                self._remember(key, box)
                return box
            self.stats["detections"] += 1
            detections = self.detector.detect(image_bgr)
            chosen = None
            for cand, score in detections:
                cand = cand.clip(w, h)
                if cand.width > 0 and cand.height > 0:
                    chosen = (cand, float(score))
                    break
            if chosen is None:
                raise NoFaceError(NO_FACE_MESSAGE)
            box, score = chosen
            self._remember(key, box)
            self._write_disk(key, box, score, w, h)
            return box

    def cache_key(self, image_bgr: np.ndarray) -> str:
        """SHA-256 hex of the detector id, the image's shape, dtype and pixels."""
        digest = hashlib.sha256()
        digest.update(str(self.detector.cache_id if self.detector is not None else "manual").encode())
        digest.update(f"|{image_bgr.shape}|{image_bgr.dtype.str}|".encode())
        digest.update(np.ascontiguousarray(image_bgr).data)
        return digest.hexdigest()

    def cache_path(self, image_bgr: np.ndarray) -> Path | None:
        """Where the disk cache keeps this image's box (``None`` without a cache dir)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / "faces" / f"{self.cache_key(image_bgr)}.json"

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

    # ------------------------------------------------------------ caches

    def _remember(self, key: str, box: FaceBox) -> None:
        self._memory[key] = box
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)

    def _read_disk(self, key: str, width: int, height: int) -> FaceBox | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / "faces" / f"{key}.json"
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable face cache %s: %s", path, exc)
            return None
        try:
            box = FaceBox(*(int(v) for v in data["box"]))
            if data.get("detector_id") != self.detector.cache_id or data.get("image_size") != [width, height]:
                raise ValueError("written for another detector or image size")
            if not (0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height):
                raise ValueError(f"box {box.as_list()} is not inside {width}x{height}")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring invalid face cache %s: %s", path, exc)
            return None
        return box

    def _write_disk(self, key: str, box: FaceBox, score: float, width: int, height: int) -> None:
        if self.cache_dir is None:
            return
        folder = self.cache_dir / "faces"
        record = {
            "box": box.as_list(),
            "score": score,
            "detector": self.detector.name,
            "detector_id": self.detector.cache_id,
            "image_size": [width, height],
        }
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key[:16]}-", suffix=".tmp")
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other workers may run as another user
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"{key}.json")
            tmp = None
        except OSError as exc:  # a read-only or full disk must not fail the request
            log.warning("could not write face cache in %s: %s", folder, exc)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


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
