"""The smooth ramp both engines blend and shape with, and the mouth-region mask they paste with."""

from __future__ import annotations

import cv2
import numpy as np

from lipsync.faces.box import Rect


def smoothstep(edge0, edge1, x):
    """0 below ``edge0``, 1 above ``edge1``, the cubic 3t^2 - 2t^3 between (continuous slope, so
    a mask built from it shows no edge). Works elementwise on arrays; edges may be arrays too."""
    t = np.clip((x - edge0) / np.maximum(edge1 - edge0, 1e-9), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def polygon_mask(polygon: np.ndarray, region: Rect, grow: float, feather: float) -> np.ndarray:
    """(region.height, region.width) float32 in [0, 1]: 1 inside ``polygon`` ((n, 2) image
    pixels) grown by ``grow`` px, fading to 0 over about ``feather`` px outside it."""
    h, w = region.height, region.width
    mask = np.zeros((h, w), np.uint8)
    pts = np.round((polygon - np.array([region.x1, region.y1], np.float32)) * 4).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=2)
    if grow >= 1:
        k = int(2 * round(grow) + 1)
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    out = mask.astype(np.float32) / 255.0
    if feather > 0.5:
        # Blur (sigma feather/3) a copy grown by 2.5 sigma: the ramp then lies outside
        # the polygon, which keeps exactly full weight, with no step at its edge.
        sigma = feather / 3.0
        k = 2 * int(np.ceil(2.5 * sigma)) + 1
        grown = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        out = np.maximum(cv2.GaussianBlur(grown, (0, 0), sigma), out)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
