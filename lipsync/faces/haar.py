"""Offline face detection with the Haar cascades that ship in OpenCV 4.x.

Used when the S3FD weights are not installed. Two frontal cascades run on an
equalised grey copy of the image (longest side shrunk to at most 640 px):

* ``haarcascade_frontalface_default`` gives the box we keep (its framing is
  the S3FD-like one, see ``CALIBRATION``), but it fires on textures (coins,
  embroidery, cells) with a handful of neighbours;
* ``haarcascade_frontalface_alt2`` rarely fires on textures; it confirms.

A candidate face is a default-cascade detection, an alt2 detection, or both
merged when they overlap (IoU >= 0.5). Its evidence is the sum of the
neighbour counts OpenCV reports (how many overlapping windows voted for it).
Faces are kept when the evidence reaches ``min_evidence`` (40). Measured with
the settings below (scale step 1.05, minNeighbors 3): real faces of 60 px and
more score 120..400 (both cascades), 27 px faces about 24; the worst false
positives seen on 25 textured and natural face-free images (skimage's
sample images, the fixtures' backgrounds, random noise) score 22 (one cascade)
and 23 (both, on a microscope image of cells).

``profileface`` is deliberately not used: it fires more often on textures,
its boxes are framed differently (off by 15-30 % on the fixtures' near-frontal
faces) and we have no profile image to calibrate it on; Wav2Lip needs a
near-frontal face anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from lipsync.errors import CheckpointError
from lipsync.faces.box import FaceBox

# Mapping of each cascade's raw box (x, y, w, h) to S3FD-like framing, as
# fractions of the raw box: centre moves by (dx * w, dy * h), size becomes
# (sx * w, sy * h).
#
# Calibration: least-squares fit (per parameter, the mean over images) of the
# raw boxes against the three fixture boxes (avatar.jpg, kennedy_low.jpg,
# mona_low.jpg: forehead-to-chin, cheek-to-cheek, marked by eye), with this
# module's settings (max side 640, equalised grey, scale step 1.05).
# ``fit_calibration`` below reproduces it and tests/test_faces.py checks it.
#
#   default: dx +0.001, dy -0.002, sx = sy 0.993 (per image 0.998/0.996/0.983)
#   alt2:    dx +0.002, dy +0.002, sx = sy 1.040 (per image 1.029/1.043/1.047)
#
# So frontalface_default already frames forehead (about hairline) to just
# below the chin and cheek to cheek: the framing S3FD is trained for on WIDER
# FACE and that Wav2Lip crops. The common belief that Haar boxes are
# "eyebrows to upper lip" holds for tighter detectors (dlib's HOG) and for
# frontalface_alt/alt2, whose boxes are about 4 % smaller around the same
# centre. Offsets under 1 % are rounded to 0: they are within the spread
# between images (~1.5 %) and the fixtures' own marking precision.
CALIBRATION: dict[str, tuple[float, float, float, float]] = {
    # cascade: (dx, dy, sx, sy)
    "default": (0.0, 0.0, 1.0, 1.0),
    "alt2": (0.0, 0.0, 1.04, 1.04),
}
CASCADE_FILES = {
    "default": "haarcascade_frontalface_default.xml",
    "alt2": "haarcascade_frontalface_alt2.xml",
}
CALIBRATION_VERSION = "haar-v1"


class HaarDetector:
    """Frontal-face detection with OpenCV Haar cascades, boxes in S3FD framing.

    ``HaarDetector()`` loads the cascades (``CheckpointError`` if this OpenCV
    build has none: OpenCV 5 dropped them). ``detect(image)`` is serialised
    by an internal lock (OpenCV cascades are not safe to share between
    threads).

    Parameters: ``max_side`` (px, the image is shrunk so its longest side is
    at most this for detection; boxes are scaled back), ``scale_factor``
    (pyramid step), ``min_face_fraction`` (smallest face side searched, as a
    fraction of the image's shorter side, and never under 24 px),
    ``min_evidence`` (neighbour votes needed, see the module docstring).
    """

    name = "haar"

    def __init__(
        self,
        *,
        max_side: int = 640,
        scale_factor: float = 1.05,
        min_face_fraction: float = 0.08,
        min_evidence: int = 40,
    ):
        self.max_side = int(max_side)
        self.scale_factor = float(scale_factor)
        self.min_face_fraction = float(min_face_fraction)
        self.min_evidence = int(min_evidence)
        self._cascades: dict[str, cv2.CascadeClassifier] = {}
        folder = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or "")
        for key, filename in CASCADE_FILES.items():
            path = folder / filename
            cascade = cv2.CascadeClassifier(str(path)) if path.is_file() else None
            if cascade is None or cascade.empty():
                raise CheckpointError(
                    f"OpenCV Haar cascade {filename} not found (looked in {folder or 'cv2.data'}); "
                    "install opencv-python-headless 4.x or provide the S3FD weights"
                )
            self._cascades[key] = cascade
        self._lock = threading.Lock()
        self.cache_id = (
            f"{CALIBRATION_VERSION}:side{self.max_side}:sf{self.scale_factor:g}:"
            f"min{self.min_face_fraction:g}:ev{self.min_evidence}"
        )

    # ------------------------------------------------------------ public

    def detect(self, image_bgr: np.ndarray) -> list[tuple[FaceBox, float]]:
        """Faces as ``(FaceBox, evidence)``, largest first.

        ``image_bgr``: ``(H, W, 3)`` uint8 BGR, ``(H, W, 4)`` BGRA, or grey
        ``(H, W)`` / ``(H, W, 1)``. Boxes in pixels of that image, S3FD-like
        framing, clipped to it; ``evidence`` = summed neighbour votes (>=
        ``min_evidence``). An empty list means no face.
        """
        faces = [c for c in self.candidates(image_bgr) if c["evidence"] >= self.min_evidence]
        h, w = image_bgr.shape[:2]
        out = []
        for c in faces:
            box = _to_facebox(c["box"]).clip(w, h)
            if box.width > 0 and box.height > 0:
                out.append((box, float(c["evidence"])))
        out.sort(key=lambda d: (-(d[0].width * d[0].height), -d[1]))
        return out

    def candidates(self, image_bgr: np.ndarray) -> list[dict]:
        """Every candidate before the evidence threshold, for diagnostics.

        Each is ``{"box": (x1, y1, x2, y2) float px, S3FD framing,
        "evidence": int, "raw": {cascade: (x, y, w, h) px}, "votes":
        {cascade: int}}``.
        """
        grey, scale = self._prepare(image_bgr)
        raw = self._run_cascades(grey)
        found = []
        for key, dets in raw.items():
            for rect, votes in dets:
                rect = tuple(v / scale for v in rect)
                found.append((key, rect, votes))
        return _merge(found)

    def describe(self) -> dict:
        return {
            "detector": "haar",
            "cascades": list(CASCADE_FILES.values()),
            "calibration": {k: dict(zip(("dx", "dy", "sx", "sy"), v)) for k, v in CALIBRATION.items()},
            "min_evidence": self.min_evidence,
        }

    # ------------------------------------------------------------ internals

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            grey = image
        elif image.ndim == 3 and image.shape[2] == 3:
            grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        elif image.ndim == 3 and image.shape[2] == 4:
            grey = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        else:
            raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
        h, w = grey.shape
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        return cv2.equalizeHist(np.ascontiguousarray(grey)), scale

    def _run_cascades(self, grey: np.ndarray) -> dict[str, list[tuple[tuple[int, int, int, int], int]]]:
        side = max(24, int(round(self.min_face_fraction * min(grey.shape))))
        out: dict[str, list] = {}
        if min(grey.shape) < side:
            return {key: [] for key in self._cascades}
        with self._lock:
            for key, cascade in self._cascades.items():
                rects, votes = cascade.detectMultiScale2(
                    grey, scaleFactor=self.scale_factor, minNeighbors=3, minSize=(side, side)
                )
                out[key] = [(tuple(int(v) for v in r), int(n)) for r, n in zip(rects, np.ravel(votes))]
        return out


def apply_calibration(rect: Sequence[float], params: Sequence[float]) -> tuple[float, float, float, float]:
    """Map a raw cascade rect ``(x, y, w, h)`` with ``(dx, dy, sx, sy)``.

    Returns ``(x1, y1, x2, y2)`` floats (px): centre shifted by ``(dx * w,
    dy * h)``, size scaled to ``(sx * w, sy * h)``.
    """
    x, y, w, h = rect
    dx, dy, sx, sy = params
    cx, cy = x + w / 2 + dx * w, y + h / 2 + dy * h
    nw, nh = sx * w, sy * h
    return (cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2)


def fit_calibration(pairs: Iterable[tuple[Sequence[float], Sequence[float]]]) -> tuple[float, float, float, float]:
    """Fit ``(dx, dy, sx, sy)`` so raw rects ``(x, y, w, h)`` map onto targets.

    ``pairs``: ``(raw_rect, target_box)`` with ``target_box`` ``(x1, y1,
    x2, y2)``. Each parameter is independent in the box-relative frame, so the
    least-squares solution is the mean of the per-image ratios:
    ``dx = mean((target_cx - raw_cx) / w)``, ``sx = mean(target_w / w)``.
    """
    rows = []
    for (x, y, w, h), (tx1, ty1, tx2, ty2) in pairs:
        rows.append((
            ((tx1 + tx2) / 2 - (x + w / 2)) / w,
            ((ty1 + ty2) / 2 - (y + h / 2)) / h,
            (tx2 - tx1) / w,
            (ty2 - ty1) / h,
        ))
    if not rows:
        raise ValueError("fit_calibration needs at least one pair")
    return tuple(float(v) for v in np.mean(np.asarray(rows), axis=0))


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (half-open)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _merge(found: list[tuple[str, tuple[float, float, float, float], int]]) -> list[dict]:
    """Pair default and alt2 detections that overlap; keep the rest alone.

    A pair's box is the mean of both calibrated boxes; its evidence the sum
    of votes. Greedy by IoU, each detection used once.
    """
    mapped = [(key, rect, votes, apply_calibration(rect, CALIBRATION[key])) for key, rect, votes in found]
    defaults = [m for m in mapped if m[0] == "default"]
    alts = [m for m in mapped if m[0] == "alt2"]
    pairs = sorted(
        ((iou(d[3], a[3]), i, j) for i, d in enumerate(defaults) for j, a in enumerate(alts)),
        reverse=True,
    )
    used_d: set[int] = set()
    used_a: set[int] = set()
    out = []
    for overlap, i, j in pairs:
        if overlap < 0.5:
            break
        if i in used_d or j in used_a:
            continue
        used_d.add(i)
        used_a.add(j)
        d, a = defaults[i], alts[j]
        box = tuple((p + q) / 2 for p, q in zip(d[3], a[3]))
        out.append({"box": box, "evidence": d[2] + a[2], "raw": {"default": d[1], "alt2": a[1]},
                    "votes": {"default": d[2], "alt2": a[2]}})
    for idx, group in ((used_d, defaults), (used_a, alts)):
        for k, m in enumerate(group):
            if k not in idx:
                out.append({"box": m[3], "evidence": m[2], "raw": {m[0]: m[1]}, "votes": {m[0]: m[2]}})
    return out


def _to_facebox(box: Sequence[float]) -> FaceBox:
    return FaceBox(*(int(round(v)) for v in box))
