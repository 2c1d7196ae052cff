"""468 face landmarks (MediaPipe's face mesh) on a still image, run by OpenCV's DNN module.

The model is MediaPipe's ``face_landmark.tflite`` (Apache-2.0, ``data/NOTICE``):
a 192x192 RGB crop of the face in [0, 1] -> 468 (x, y, z) points in crop pixels
and a face score. It ships inside the package (2.4 MB), so landmarks work on
first start with nothing downloaded and no second runtime: ``cv2.dnn`` reads
TFLite models natively (OpenCV >= 4.7).

``FaceMesh().locate(image_bgr, box)`` runs it twice, as MediaPipe's own tracking
does: once on a square crop around the detector's box, then on a crop fitted to
the first answer and turned upright by the eyes' angle. Points come back in
image pixels. The index groups below name the points the mouth code uses
(the same numbering as MediaPipe's documentation).

One ``cv2.dnn.Net`` is not safe to call from two threads: calls are serialised.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from functools import cache
from importlib import resources

import cv2
import numpy as np

from lipsync.faces.box import FaceBox

log = logging.getLogger(__name__)

MODEL_FILE = "face_landmark.tflite"
MODEL_SHA256 = "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493"
INPUT_SIZE = 192          # the model's square input, pixels
ROI_SCALE = 1.5           # crop side = this x the face's extent (MediaPipe's value)
MIN_SCORE = 0.5           # face presence below this: no landmarks
N_POINTS = 468

# Lip contours, left mouth corner to right (image left/right), MediaPipe numbering.
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263   # the subject's right/left eye corners
NOSE_TIP, SUBNASALE, CHIN = 1, 2, 152
# The face's outline, clockwise from the top of the forehead.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)


@dataclass(frozen=True)
class Landmarks:
    """The face mesh on one image: ``points`` (468, 2) float32 image pixels, ``score`` in [0, 1]."""

    points: np.ndarray
    score: float

    def take(self, indices) -> np.ndarray:
        """The (len(indices), 2) points of ``indices``."""
        return self.points[list(indices)]

    def lower_face(self) -> np.ndarray:
        """(n, 2) polygon of the part of the face a mouth moves: the face outline below
        the base of the nose, closed by a line just under the nose."""
        oval = self.take(FACE_OVAL)
        top = float(self.points[SUBNASALE, 1])
        below = oval[:, 1] > top
        if below.sum() < 3:
            return oval
        # The outline is a closed loop: rotate it so the part below the nose is one run.
        start = int(np.argmax(~below & np.roll(below, -1))) + 1
        run = np.roll(oval, -start, axis=0)[:int(below.sum())]
        return np.concatenate([run, self.points[[SUBNASALE]]]).astype(np.float32)

    @property
    def roll(self) -> float:
        """Head roll, radians (positive: the subject's left eye lower in the image)."""
        a, b = self.points[RIGHT_EYE_OUTER], self.points[LEFT_EYE_OUTER]
        return float(np.arctan2(b[1] - a[1], b[0] - a[0]))


class FaceMesh:
    """The face-mesh model, loaded once; ``locate`` is safe to call from many threads."""

    def __init__(self):
        self._net = _load_net()
        self._lock = threading.Lock()

    def locate(self, image_bgr: np.ndarray, box: FaceBox) -> Landmarks | None:
        """Landmarks of the face in ``box`` (detector framing, pixels), or None when the
        model sees no face there (score < ``MIN_SCORE``)."""
        cx, cy = 0.5 * (box.x1 + box.x2), 0.5 * (box.y1 + box.y2)
        first = self._run(image_bgr, cx, cy, ROI_SCALE * max(box.width, box.height), 0.0)
        if first is None:
            return None
        lo, hi = first.points.min(axis=0), first.points.max(axis=0)
        centre = 0.5 * (lo + hi)
        return self._run(image_bgr, float(centre[0]), float(centre[1]),
                         ROI_SCALE * float(max(hi - lo)), first.roll) or first

    def follow(self, image_bgr: np.ndarray, previous: Landmarks) -> Landmarks | None:
        """The face of ``previous`` (found on an earlier frame of a video) on this frame: one
        pass of the model where it was, at its size and roll; None when it is gone."""
        lo, hi = previous.points.min(axis=0), previous.points.max(axis=0)
        centre = 0.5 * (lo + hi)
        return self._run(image_bgr, float(centre[0]), float(centre[1]), ROI_SCALE * float(max(hi - lo)),
                         previous.roll)

    def _run(self, image_bgr: np.ndarray, cx: float, cy: float, side: float, angle: float) -> Landmarks | None:
        scale = INPUT_SIZE / max(side, 1.0)
        c, s = np.cos(angle) * scale, np.sin(angle) * scale
        # image -> crop: rotate by -angle about (cx, cy), scale, centre in the crop
        to_crop = np.array([[c, s, 0.0], [-s, c, 0.0]])
        to_crop[:, 2] = INPUT_SIZE / 2.0 - to_crop[:, :2] @ np.array([cx, cy])
        crop = cv2.warpAffine(image_bgr, to_crop, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_AREA
                              if scale < 1 else cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        blob = cv2.dnn.blobFromImage(crop, 1.0 / 255.0, swapRB=True)
        with self._lock:
            self._net.setInput(blob)
            outputs = self._net.forward(self._net.getUnconnectedOutLayersNames())
        flat = sorted((o.reshape(-1) for o in outputs), key=len)
        score = float(1.0 / (1.0 + np.exp(-float(flat[0][-1]))))
        if score < MIN_SCORE:
            return None
        crop_xy = flat[-1].reshape(N_POINTS, 3)[:, :2].astype(np.float64)
        back = cv2.invertAffineTransform(to_crop)
        points = crop_xy @ back[:, :2].T + back[:, 2]
        return Landmarks(points=points.astype(np.float32), score=score)


@cache
def _load_net() -> cv2.dnn.Net:
    data = resources.files("lipsync.faces") / "data" / MODEL_FILE
    model = data.read_bytes()
    if hashlib.sha256(model).hexdigest() != MODEL_SHA256:
        raise RuntimeError(f"{data} is not the face-mesh model this code was written for (sha256 differs)")
    return cv2.dnn.readNetFromTFLite(np.frombuffer(model, np.uint8))


@cache
def shared_mesh() -> FaceMesh:
    """The process's one ``FaceMesh`` (the model costs ~10 MB and 50 ms to load)."""
    return FaceMesh()


def face_landmarks(image_bgr: np.ndarray, box: FaceBox) -> Landmarks | None:
    """The face mesh of the face in ``box``, or None when there is none to be had (the
    model sees no face there, or OpenCV cannot run it): callers then fall back to
    what the box alone tells them."""
    try:
        return shared_mesh().locate(image_bgr, box)
    except cv2.error as exc:  # a broken OpenCV build must not take an engine down
        log.warning("the face mesh failed (%s); going on without landmarks", exc)
        return None


def follow_landmarks(image_bgr: np.ndarray, previous: Landmarks) -> Landmarks | None:
    """``FaceMesh.follow`` on the shared mesh: the face of ``previous`` on the next frame of a
    video, or None (gone, or OpenCV cannot run the model)."""
    try:
        return shared_mesh().follow(image_bgr, previous)
    except cv2.error as exc:
        log.warning("the face mesh failed (%s); going on without landmarks", exc)
        return None
