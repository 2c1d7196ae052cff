"""Finding the mouth on a still face and drawing it open, spread or rounded.

``locate_mouth(image, box)`` looks for the lips inside the lower face: the dark
lip-parting line (a horizontal valley of lightness) and the lips' redness (Lab
a*, useless on greyscale photos, where the valley alone is used), restricted to
the band where a mouth can be in an S3FD-framed box. When the evidence is weak
or implausible it falls back to a geometric prior.

``MouthRenderer(image, box, geometry)`` precomputes everything for one avatar:
the lower-face region, base sampling grids, unit displacement fields (jaw and
lower lip down, upper lip up, lips in or out sideways), the feathered mask and
the mouth-interior colours. ``render(open, wide)`` then only combines fields
linearly, runs one ``cv2.remap`` and paints the opening; it never mutates the
renderer, so one instance can serve concurrent requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from lipsync.engines.base import Region
from lipsync.engines.blend import smoothstep
from lipsync.faces import landmarks
from lipsync.faces.box import FaceBox
from lipsync.faces.landmarks import Landmarks

# Where the mouth is in an S3FD box (forehead to chin), as fractions of it.
PRIOR_LINE_Y = 0.79
PRIOR_HALF_WIDTH = 0.145
PRIOR_UPPER_LIP = 0.045
PRIOR_LOWER_LIP = 0.055

# Motion range, as fractions of the box height / mouth half-width.
MAX_DROP = 0.075        # lower lip drop at open=1 (box heights) when the mouth width is unknown
DROP_PER_WIDTH = 0.30   # ... and as a fraction of the mouth's width (corner to corner)
UPPER_LIFT = 0.14       # upper lip lift, as a fraction of the drop
JAW_FOLLOW = 0.8        # how much of the lip drop the chin follows
MAX_SPREAD = 0.12       # horizontal stretch of the lips at wide=+1
MAX_ROUND = 0.24        # horizontal squeeze of the lips at wide=-1


@dataclass(frozen=True)
class MouthGeometry:
    """The closed mouth on the avatar, in image pixels.

    ``cx``, ``cy``: middle of the lip-parting line; ``half_width``: centre to a
    corner; ``curve``: (a, b) with the line at y = cy + b*(x-cx) + a*(x-cx)**2;
    ``upper``/``lower``: lip thicknesses above/below the line; ``lip_bgr``,
    ``skin_bgr``: mean colours; ``method``: "landmarks" (the face mesh), "analysis"
    (the pixels alone) or "prior" (where a mouth usually is in the box).
    """

    cx: float
    cy: float
    half_width: float
    curve: tuple[float, float]
    upper: float
    lower: float
    lip_bgr: tuple[float, float, float]
    skin_bgr: tuple[float, float, float]
    method: str
    profile: tuple = field(default=(), repr=False)  # ((x, y), ...) the traced line, corner to corner
    blur: float = 1.0    # the photo's own blur around the mouth (Gaussian sigma, px)
    gap: float = 0.0     # the mouth's own opening at rest (teeth of a smile), px at the centre
    teeth: bool = False  # the photo shows teeth between the lips at rest
    inner: float = 0.9   # inner lip corners' half-span as a fraction of ``half_width``

    def line_y(self, x: np.ndarray) -> np.ndarray:
        """The lip line at columns ``x``; flat beyond the corners."""
        d = np.clip(np.asarray(x, dtype=np.float64) - self.cx, -self.half_width, self.half_width)
        if len(self.profile) >= 2:
            xs = np.array([p[0] for p in self.profile])
            ys = np.array([p[1] for p in self.profile])
            return np.interp(self.cx + d, xs, ys)
        a, b = self.curve
        return self.cy + b * d + a * d * d


# --------------------------------------------------------------------------
# localisation

_CANON_W = 200.0  # analysis scale: box width in pixels


def _prior(box: FaceBox) -> tuple[float, float, float, float, float]:
    cx = box.x1 + 0.5 * box.width
    cy = box.y1 + PRIOR_LINE_Y * box.height
    return cx, cy, PRIOR_HALF_WIDTH * box.width, PRIOR_UPPER_LIP * box.height, PRIOR_LOWER_LIP * box.height


def _mean_color(image: np.ndarray, x1, y1, x2, y2) -> tuple[float, float, float]:
    h, w = image.shape[:2]
    x1, x2 = int(np.clip(x1, 0, w - 1)), int(np.clip(x2, 1, w))
    y1, y2 = int(np.clip(y1, 0, h - 1)), int(np.clip(y2, 1, h))
    if x2 <= x1 or y2 <= y1:
        return (128.0, 128.0, 128.0)
    patch = image[y1:y2, x1:x2].reshape(-1, 3).astype(np.float64)
    return tuple(float(v) for v in np.median(patch, axis=0))


def locate_mouth(image: np.ndarray, box: FaceBox, landmarks: Landmarks | None = None) -> MouthGeometry:
    """Find the mouth at rest in ``box`` on a BGR ``image``.

    With the face mesh's ``landmarks`` (``lipsync.faces.landmarks``) the lip line,
    corners, thicknesses and any rest opening come from the lip contours; without
    them (or when they are implausible for ``box``) from the pixels (see module doc).
    """
    h_img, w_img = image.shape[:2]
    box = box.clip(w_img, h_img)
    if landmarks is not None:
        found = _from_landmarks(image, box, landmarks)
        if found is not None:
            return found
    pcx, pcy, phw, pup, plo = _prior(box)
    bw, bh = float(box.width), float(box.height)
    found = _analyse(image, box)
    method = "prior"
    cx, cy, hw, curve, up, lo = pcx, pcy, phw, (0.0, 0.0), pup, plo
    profile: tuple = ()
    if found is not None:
        plausible = (abs(found.cx - pcx) < 0.2 * bw and abs(found.cy - pcy) < 0.17 * bh
                     and 0.08 * bw <= found.half_width <= 0.24 * bw)
        if plausible:
            cx, hw, curve, method = found.cx, found.half_width, found.curve, "analysis"
            profile = found.profile
            cy = float(np.interp(cx, [p[0] for p in profile], [p[1] for p in profile]))
            up = found.upper if found.upper is not None else pup
            lo = found.lower if found.lower is not None else plo
    up = float(np.clip(up, 0.025 * bh, 0.075 * bh))
    lo = float(np.clip(lo, 0.03 * bh, 0.085 * bh))
    lip = _mean_color(image, cx - 0.5 * hw, cy + 0.25 * lo, cx + 0.5 * hw, cy + 0.75 * lo)
    skin = _mean_color(image, cx - 0.45 * hw, cy + lo + 0.03 * bh, cx + 0.45 * hw, cy + lo + 0.08 * bh)
    return MouthGeometry(cx=float(cx), cy=float(cy), half_width=float(hw), curve=curve,
                         upper=up, lower=lo, lip_bgr=lip, skin_bgr=skin, method=method,
                         profile=profile, blur=_blur_sigma(image, box))


def _contour_y(points: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Heights of a lip contour ((n, 2), any order) at columns ``x``."""
    order = np.argsort(points[:, 0], kind="stable")
    return np.interp(x, points[order, 0], points[order, 1])


def _lip_color(image: np.ndarray, outer_up, outer_lo, inner_up, inner_lo) -> tuple[float, float, float]:
    """Median colour of the lips themselves: inside the outer contour, outside the inner one."""
    outer = np.concatenate([outer_up, outer_lo[::-1]]).astype(np.float32)
    inner = np.concatenate([inner_up, inner_lo[::-1]]).astype(np.float32)
    x1, y1 = np.floor(outer.min(axis=0)).astype(int) - 1
    x2, y2 = np.ceil(outer.max(axis=0)).astype(int) + 2
    h, w = image.shape[:2]
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 - x1 < 3 or y2 - y1 < 3:
        return (128.0, 128.0, 128.0)
    mask = np.zeros((y2 - y1, x2 - x1), np.uint8)
    offset = np.array([x1, y1], np.float32)
    cv2.fillPoly(mask, [np.round(outer - offset).astype(np.int32)], 1)
    cv2.fillPoly(mask, [np.round(inner - offset).astype(np.int32)], 0)
    pixels = image[y1:y2, x1:x2][mask > 0].astype(np.float64)
    if pixels.shape[0] < 4:
        return (128.0, 128.0, 128.0)
    return tuple(float(v) for v in np.median(pixels, axis=0))


def _from_landmarks(image: np.ndarray, box: FaceBox, lm: Landmarks) -> MouthGeometry | None:
    """The mouth from the face mesh's lip contours, or None when they do not fit ``box``.

    The line the mouth opens along runs through the middle of the inner lips: on a
    closed mouth that is where the lips meet; on a smile showing its teeth it is
    where the upper teeth meet the lower ones, so the upper teeth stay with the
    upper lip and the lower teeth go down with the jaw.
    """
    bw, bh = float(box.width), float(box.height)
    left, right = lm.points[landmarks.LIPS_OUTER_UPPER[0]], lm.points[landmarks.LIPS_OUTER_UPPER[-1]]
    half_width = 0.5 * float(right[0] - left[0])
    cx = 0.5 * float(left[0] + right[0])
    centre_y = 0.5 * float(left[1] + right[1])
    if not (0.06 * bw <= half_width <= 0.35 * bw and box.x1 <= cx <= box.x2
            and box.y1 + 0.4 * bh <= centre_y <= box.y2 + 0.15 * bh):
        return None
    inner_up, inner_lo = lm.take(landmarks.LIPS_INNER_UPPER), lm.take(landmarks.LIPS_INNER_LOWER)
    outer_up, outer_lo = lm.take(landmarks.LIPS_OUTER_UPPER), lm.take(landmarks.LIPS_OUTER_LOWER)
    xs = np.linspace(float(left[0]), float(right[0]), max(9, int(round(half_width)) | 1))
    # Between the inner corners: the middle of the inner lips; from there out to the
    # outer corners: straight to the corner.
    il, ir = float(inner_up[0, 0]), float(inner_up[-1, 0])
    mid = 0.5 * (_contour_y(inner_up, xs) + _contour_y(inner_lo, xs))
    ys = np.where(xs < il, np.interp(xs, [left[0], il], [left[1], 0.5 * (inner_up[0, 1] + inner_lo[0, 1])]),
                  np.where(xs > ir, np.interp(xs, [ir, right[0]],
                                              [0.5 * (inner_up[-1, 1] + inner_lo[-1, 1]), right[1]]), mid))
    cy = float(np.interp(cx, xs, ys))
    gap = float(max(0.0, _contour_y(inner_lo, np.array([cx]))[0] - _contour_y(inner_up, np.array([cx]))[0]))
    upper = float(cy - _contour_y(outer_up, np.array([cx]))[0])
    lower = float(_contour_y(outer_lo, np.array([cx]))[0] - cy)
    upper = float(np.clip(upper, 0.015 * bh, 0.09 * bh))
    lower = float(np.clip(lower, 0.02 * bh, 0.1 * bh))
    inner = float(np.clip(0.5 * (ir - il) / max(half_width, 1.0), 0.6, 0.98))
    # A straight-line fit (slope) for code that wants one; the profile is what is drawn.
    slope = float(np.polyfit(xs - cx, ys, 1)[0]) if xs.size > 2 else 0.0
    lip = _lip_color(image, outer_up, outer_lo, inner_up, inner_lo)
    skin = _mean_color(image, cx - 0.45 * half_width, cy + lower + 0.03 * bh,
                       cx + 0.45 * half_width, cy + lower + 0.08 * bh)
    # Teeth at rest: a real gap between the lips, lighter and less red than the lips.
    teeth = False
    if gap > 0.15 * half_width:
        strip = _mean_color(image, cx - 0.4 * half_width, cy - 0.25 * gap, cx + 0.4 * half_width, cy + 0.25 * gap)
        lab = cv2.cvtColor(np.array([[strip, lip]], np.uint8), cv2.COLOR_BGR2LAB).astype(np.float32)[0]
        teeth = bool(lab[0, 0] > lab[1, 0] + 8.0 and lab[0, 1] < lab[1, 1] - 2.0)
    return MouthGeometry(cx=cx, cy=cy, half_width=half_width, curve=(0.0, slope), upper=upper, lower=lower,
                         lip_bgr=lip, skin_bgr=skin, method="landmarks",
                         profile=tuple((float(x), float(y)) for x, y in zip(xs, ys)),
                         blur=_blur_sigma(image, box), gap=gap, inner=inner, teeth=teeth)


def _blur_sigma(image: np.ndarray, box: FaceBox) -> float:
    """How blurred the lower face is (Gaussian sigma in px), from its strong edges.

    A step edge blurred by sigma and measured at scale s has a gradient peak
    proportional to 1/sqrt(sigma^2 + s^2); the ratio of peaks at two scales
    gives sigma. Used to make the painted mouth exactly as soft as the photo.
    """
    bw, bh = box.width, box.height
    h, w = image.shape[:2]
    x1, x2 = int(max(0, box.x1 + 0.25 * bw)), int(min(w, box.x2 - 0.25 * bw))
    y1, y2 = int(max(0, box.y1 + 0.62 * bh)), int(min(h, box.y1 + 0.95 * bh))
    if x2 - x1 < 12 or y2 - y1 < 12:
        return 1.0
    grey = cv2.cvtColor(image[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY).astype(np.float32)

    def grad(sig):
        b = cv2.GaussianBlur(grey, (0, 0), sig)
        return np.hypot(cv2.Sobel(b, cv2.CV_32F, 1, 0), cv2.Sobel(b, cv2.CV_32F, 0, 1)) / 8.0

    a, b = 0.7, 2.5
    fine = cv2.dilate(grad(a), np.ones((5, 5), np.uint8))
    coarse = grad(b)
    sel = coarse > np.percentile(coarse, 97)
    if sel.sum() < 5:
        return 1.0
    r = float(np.clip(np.median(coarse[sel] / np.maximum(fine[sel], 1e-6)), 0.05, 0.97))
    sig2 = (r * r * b * b - a * a) / (1.0 - r * r)
    return float(np.clip(np.sqrt(max(sig2, 0.0)), 0.5, 0.02 * bh))


@dataclass(frozen=True)
class _LipLine:
    """What the pixels say about the closed mouth, in image pixels."""

    cx: float                       # centre between the corners
    cy: float                       # the fitted line's height at the centre
    half_width: float               # centre to corner
    curve: tuple[float, float]      # (a, b) of y = cy + b*d + a*d^2, d = x - cx
    upper: float | None             # upper lip thickness (None: not measurable, e.g. greyscale)
    lower: float | None             # lower lip thickness
    profile: tuple                  # ((x, y), ...) the traced line, corner to corner


@dataclass(frozen=True)
class _Band:
    """The lower face cut out and scaled so the box is ``_CANON_W`` wide, as analysis planes."""

    x1: int                         # where the band starts in the image (pixels)
    y1: int
    scale: float                    # band pixels per image pixel
    lightness: np.ndarray           # (h, w) float32 L* (lightly blurred)
    valley: np.ndarray              # (h, w) how much darker each pixel is than 4 px above and below
    red: np.ndarray                 # (h, w) redness above the band's median a*
    red_top: float                  # the 98th percentile of ``red``
    colourful: bool                 # False for greyscale photos (no redness to use)


def _analyse(image: np.ndarray, box: FaceBox) -> _LipLine | None:
    """Lip line, corners and thicknesses from the pixels, or None when unsure.

    Works at a canonical scale (box width 200 px). Candidates are long dark
    horizontal valleys (the lip parting) in the lower face, weighted by where
    a mouth sits in an S3FD box (loosely: detector boxes are off by 10-15 %)
    and, on colour photos, by redness above and below the line. The best few
    are traced sideways to the corners; the one that looks most like a mouth
    (strong, long enough, near the expected place) wins.
    """
    band = _lower_face_band(image, box)
    if band is None:
        return None
    pts = _best_lip_line(band, box)
    if pts is None:
        return None
    s = band.scale
    xl, xr = pts[0, 0], pts[-1, 0]
    centre_x = 0.5 * (xl + xr)
    half_width = 0.5 * (xr - xl)
    centre_y, slope, bend = _fit_curve(pts, centre_x, half_width)
    upper, lower = _lip_thickness(band, box, centre_x, centre_y) if band.colourful else (None, None)
    profile = tuple((float(band.x1 + x / s), float(band.y1 + y / s))
                    for x, y in zip(pts[:, 0], _smooth_line(pts[:, 1])))
    return _LipLine(cx=band.x1 + centre_x / s, cy=band.y1 + centre_y / s, half_width=half_width / s,
                    curve=(bend * s, slope), upper=upper, lower=lower, profile=profile)


def _lower_face_band(image: np.ndarray, box: FaceBox) -> _Band | None:
    """The part of the face where the mouth can be, as analysis planes (None: too small)."""
    bw, bh = float(box.width), float(box.height)
    if bw < 24 or bh < 24:
        return None
    s = _CANON_W / bw  # analysis scale
    h_img, w_img = image.shape[:2]
    x1, x2 = int(max(0, box.x1 + 0.08 * bw)), int(min(w_img, box.x1 + 0.92 * bw))
    y1, y2 = int(max(0, box.y1 + 0.55 * bh)), int(min(h_img, box.y1 + 1.02 * bh))
    if x2 - x1 < 8 or y2 - y1 < 8:
        return None
    crop = cv2.resize(image[y1:y2, x1:x2],
                      (max(8, int(round((x2 - x1) * s))), max(8, int(round((y2 - y1) * s)))),
                      interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(crop, cv2.COLOR_BGR2LAB).astype(np.float32)
    lightness = cv2.GaussianBlur(lab[..., 0], (0, 0), 1.2)
    green_red = cv2.GaussianBlur(lab[..., 1], (0, 0), 2.0)
    if min(lightness.shape) < 12:
        return None
    # Dark horizontal line: lighter 4 px above and below than on the line.
    k = 4
    valley = np.zeros_like(lightness)
    valley[k:-k] = 0.5 * (lightness[:-2 * k] + lightness[2 * k:]) - lightness[k:-k]
    valley = np.maximum(valley, 0)
    # Redness: lips against the skin (the band is mostly skin).
    red = np.clip(green_red - float(np.median(green_red)), 0, None)
    red_top = float(np.percentile(red, 98))
    return _Band(x1=x1, y1=y1, scale=s, lightness=lightness, valley=valley, red=red, red_top=red_top,
                 colourful=red_top > 4.0)


def _best_lip_line(band: _Band, box: FaceBox) -> np.ndarray | None:
    """The traced line ((n, 3) [x, y, strength] in band pixels) that looks most like a mouth."""
    s = band.scale
    bw, bh = float(box.width), float(box.height)
    ch, cw = band.lightness.shape
    # Long horizontal support: the valley averaged over a fifth of the face width.
    win = int(0.2 * _CANON_W) | 1
    support = cv2.blur(band.valley, (win, 3))
    if band.colourful:
        d = int(max(2, 0.03 * bh * s))
        red_w = cv2.blur(band.red, (win, 3))
        near = np.zeros_like(red_w)
        near[d:-d] = np.minimum(red_w[:-2 * d], red_w[2 * d:])
        support = support * (0.4 + near / (near.max() + 1e-6))
    # Where a mouth sits in the box (loose: boxes are off by 10-15 %).
    px = (box.x1 + 0.5 * bw - band.x1) * s
    py = (box.y1 + PRIOR_LINE_Y * bh - band.y1) * s
    yy = np.arange(ch, dtype=np.float32)[:, None]
    xx = np.arange(cw, dtype=np.float32)[None, :]
    prior = np.exp(-0.5 * (((yy - py) / (0.1 * bh * s)) ** 2 + ((xx - px) / (0.15 * _CANON_W)) ** 2))
    noise = float(np.median(support)) + 1e-3
    best_quality, best = None, None
    work = support * prior
    for _ in range(4):  # the strongest few candidates, far enough apart
        yi, xi = np.unravel_index(int(np.argmax(work)), work.shape)
        if work[yi, xi] <= 0 or support[yi, xi] < 2.0 * noise or support[yi, xi] < 0.8:
            break
        work[max(0, yi - 6):yi + 7, :] = 0
        pts = _trace(band.valley, band.red if band.colourful else None, band.red_top, int(yi), int(xi))
        if pts is None:
            continue
        half = 0.5 * (pts[-1, 0] - pts[0, 0])
        if not (0.08 * _CANON_W <= half <= 0.24 * _CANON_W):
            continue
        strength = float(np.mean(pts[:, 2]))
        quality = strength * float(prior[yi, xi]) * min(1.0, half / (0.12 * _CANON_W))
        if best is None or quality > best_quality:
            best_quality, best = quality, pts
    return best


def _fit_curve(pts: np.ndarray, centre_x: float, half_width: float) -> tuple[float, float, float]:
    """(c, b, a) of y = c + b*d + a*d^2 (d = x - centre_x) through the traced line, weighted by
    strength, with slope and bend kept modest: a smile, not a parabola gone wild."""
    d = pts[:, 0] - centre_x
    design = np.stack([np.ones_like(d), d, d * d], axis=1) * pts[:, 2:3]
    coef, *_ = np.linalg.lstsq(design, pts[:, 1] * pts[:, 2], rcond=None)
    c0, b1, a2 = (float(v) for v in coef)
    a2 = float(np.clip(a2, -0.15 / max(half_width, 1), 0.15 / max(half_width, 1)))
    b1 = float(np.clip(b1, -0.1, 0.1))
    return c0, b1, a2


def _lip_thickness(band: _Band, box: FaceBox, centre_x: float, centre_y: float) -> tuple[float | None, float | None]:
    """Upper and lower lip thickness (image pixels) from the redness profile along the centre
    column; None where the lip is thinner than 2 band pixels."""
    s = band.scale
    bh = float(box.height)
    ch = band.red.shape[0]
    centre = band.red[:, max(0, int(centre_x) - 3): int(centre_x) + 4].mean(axis=1)
    yc = int(np.clip(round(centre_y), 0, ch - 1))
    thr = 0.4 * max(centre[max(0, yc - int(0.06 * bh * s)): yc + int(0.08 * bh * s)].max(), 1e-3)
    top = yc
    while top > 0 and centre[top - 1] > thr and yc - top < 0.09 * bh * s:
        top -= 1
    bot = yc
    while bot < ch - 1 and centre[bot + 1] > thr and bot - yc < 0.1 * bh * s:
        bot += 1
    upper = (yc - top) / s if yc - top >= 2 else None
    lower = (bot - yc) / s if bot - yc >= 2 else None
    return upper, lower


def _smooth_line(ys: np.ndarray) -> np.ndarray:
    """The line's heights column by column (follows asymmetric mouths), lightly smoothed."""
    width = min(7, len(ys) // 2 * 2 - 1)
    if width < 3:
        return ys
    padded = np.pad(ys, width // 2, mode="edge")
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def _trace(valley: np.ndarray, red: np.ndarray | None, red_top: float, yi: int, xi: int):
    """Follow a dark line from (xi, yi) left and right while it stays dark (and
    red on colour photos). Returns (n, 3) [x, y, strength] sorted by x, or None."""
    ch, cw = valley.shape
    ref = float(valley[yi, max(0, xi - 8):xi + 9].mean()) + 1e-6

    def walk(step: int):
        pts = []
        y = float(yi)
        weak = 0
        x = xi
        while 0 <= x < cw:
            lo_, hi_ = int(max(0, y - 2)), int(min(ch, y + 3))
            seg = valley[lo_:hi_, x]
            j = int(np.argmax(seg))
            v = float(seg[j])
            # Sub-pixel position of the valley (parabola through 3 samples).
            off = 0.0
            if 0 < j < seg.size - 1:
                den = seg[j - 1] - 2 * seg[j] + seg[j + 1]
                if den < 0:
                    off = float(np.clip(0.5 * (seg[j - 1] - seg[j + 1]) / den, -0.5, 0.5))
            strong = v > 0.35 * ref
            if red is not None:
                strong = strong and red[int(lo_ + j), x] > 0.2 * red_top
            if strong:
                y = lo_ + j
                pts.append((x, y + off, v))
                weak = 0
            else:
                weak += 1
                if weak > 3:
                    break
            x += step
        return pts

    left, right = walk(-1), walk(+1)
    if len(left) < 3 or len(right) < 3:
        return None
    return np.array(left[::-1] + right[1:], dtype=np.float64)  # both walks start at xi


# --------------------------------------------------------------------------
# rendering


def _cos_window(d: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """1 for |d| <= inner, raised-cosine down to 0 at |d| >= outer."""
    a = np.abs(d)
    t = np.clip((a - inner) / max(outer - inner, 1e-6), 0.0, 1.0)
    return 0.5 + 0.5 * np.cos(np.pi * t)


def _lens(t: np.ndarray, inner: float = 0.9) -> np.ndarray:
    """Opening profile across the mouth (t = -1 .. 1 corner to corner; the opening
    ends at the inner lip corners, ``inner`` of the way out)."""
    u = t / inner
    return np.clip(1.0 - u * u, 0.0, 1.0) ** 0.8


@dataclass(frozen=True)
class MouthShape:
    """One mouth state ready to draw on any picture of the face (``MouthRenderer.draw``):
    the warp (``cv2.remap`` maps, region pixels) and the painted opening (or None)."""

    map_x: np.ndarray
    map_y: np.ndarray
    opening: tuple | None


@dataclass(frozen=True)
class MouthState:
    """One mouth state before it meets the pixels: ``open`` in [0, 1], ``wide`` in [-1, 1]; ``k``
    the sideways factor (map_x = X + k * side), ``drop``/``lift`` the lower/upper lip's travel
    (px); per mouth column (``mx1`` .. ``mx2``) the opening's upper and lower edges ``yu``,
    ``yl`` and the row ``ys`` between them where the warp changes from lip to jaw (float32 px)."""

    open: float
    wide: float
    k: float
    drop: float
    lift: float
    yu: np.ndarray
    yl: np.ndarray
    ys: np.ndarray


class MouthRenderer:
    """Per-avatar precomputation and the per-frame mouth drawing (see module doc)."""

    def __init__(self, image: np.ndarray, box: FaceBox, geometry: MouthGeometry):
        h_img, w_img = image.shape[:2]
        self.geometry = g = geometry
        bw, bh = float(box.width), float(box.height)
        # A wide-open "a" drops the lower lip by about a quarter of the mouth's width;
        # a broad smile is wide for its face, so the drop is kept within the jaw's range.
        if g.method == "landmarks":
            self.max_drop = float(np.clip(DROP_PER_WIDTH * 2.0 * g.half_width, 0.05 * bh, 0.12 * bh))
        else:
            self.max_drop = MAX_DROP * bh
        self.max_lift = UPPER_LIFT * self.max_drop
        hw = g.half_width
        # The redrawn region: the lower face from under the nose to below the chin.
        jaw_half = max(0.42 * bw, 2.2 * hw)
        chin = max(float(box.y2), g.cy + g.lower + 2.0 * self.max_drop)
        x1 = int(np.floor(max(0, g.cx - jaw_half - 0.06 * bw)))
        x2 = int(np.ceil(min(w_img, g.cx + jaw_half + 0.06 * bw)))
        y1 = int(np.floor(max(0, g.cy - g.upper - 0.16 * bh)))
        y2 = int(np.ceil(min(h_img, chin + 0.2 * bh)))
        self.region = Region(x1, y1, x2, y2)
        rh, rw = y2 - y1, x2 - x1
        self.source = np.ascontiguousarray(image[y1:y2, x1:x2])
        X, Y = np.meshgrid(np.arange(rw, dtype=np.float32), np.arange(rh, dtype=np.float32))
        self.base_x, self.base_y = X, Y
        cx, cy = g.cx - x1, g.cy - y1
        self.cx, self.cy = cx, cy
        cols = np.arange(rw, dtype=np.float64)
        self.line = (g.line_y(cols + x1) - y1).astype(np.float32)  # lip line per column
        dx = X - cx
        dyl = Y - self.line[None, :]  # > 0 below the lip line
        t = dx / hw
        lens = _lens(t, g.inner)
        # Vertical room below the chin before the region ends: fields fade there.
        chin_r = chin - y1
        fade_end = min(chin_r + 0.12 * bh, rh - 0.05 * bh)
        fade_start = min(chin_r - 0.04 * bh, fade_end - 0.04 * bh)
        fade = 1.0 - smoothstep(fade_start, fade_end, Y)
        # Lower lip + jaw (downwards, unit = max drop).
        T = max(2.2 * g.lower, 2.2 * self.max_drop)
        s = smoothstep(0.0, T, dyl)
        jawx = _cos_window(dx, 1.25 * hw, max(jaw_half, 1.25 * hw + 0.1 * bw))
        low = (lens * (1.0 - s) + JAW_FOLLOW * jawx * s) * fade
        low = np.where(dyl >= 0, low, lens)
        # Upper lip (upwards, unit = max lift); fades out before the nose.
        # (the nose starts about 0.11 of the box height above the lip line)
        Tu = min(2.5 * g.upper, 0.08 * bh)
        up = lens * (1.0 - smoothstep(0.0, Tu, -dyl))
        up = np.where(dyl < 0, up, lens)
        # Smooth kinks (the lens has a vertical tangent at the corners).
        sig = max(0.6, 0.006 * bh)
        self.low = cv2.GaussianBlur(low.astype(np.float32), (0, 0), sig)
        self.up = cv2.GaussianBlur(up.astype(np.float32), (0, 0), sig)
        # Sideways field: lips pulled out (spread) or pushed in (rounded).
        sy = np.where(dyl < 0, min(1.2 * g.upper, 0.032 * bh),
                      1.2 * g.lower + 0.5 * self.max_drop).astype(np.float32)
        side = np.exp(-0.5 * ((dx / (0.9 * hw)) ** 2 + (dyl / sy) ** 2))
        side *= _cos_window(dx, 1.7 * hw, 2.6 * hw) * _cos_window(dyl / sy, 1.5, 2.5)
        self.side = (side * dx).astype(np.float32)  # map_x = X + k * side
        # Where the sideways field moves anything: only there do the fields need resampling.
        rows, cols_ = np.nonzero(np.abs(self.side) > 1e-3)
        self.side_band = ((int(rows.min()), int(rows.max()) + 1, int(cols_.min()), int(cols_.max()) + 1)
                          if rows.size else None)
        # Where anything can move (more than a third of a pixel at the
        # extremes): the mask, feathered outwards and zero on the border.
        below = (dyl >= 0).astype(np.float32)
        reach = np.maximum.reduce([self.max_drop * self.low * below,
                                   self.max_lift * self.up * (1 - below),
                                   max(MAX_SPREAD, MAX_ROUND) * np.abs(dx) * side])
        mask = np.clip(reach / 0.33, 0.0, 1.0).astype(np.float32)
        feather = max(2.0, 0.01 * bh)
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(2 * feather) | 1,) * 2))
        mask = np.clip(cv2.GaussianBlur(mask, (0, 0), feather) * 1.1, 0.0, 1.0)
        edge = max(3.0, 0.02 * bh)
        border = (_cos_window(X - (rw - 1) / 2.0, (rw - 1) / 2.0 - edge, (rw - 1) / 2.0)
                  * _cos_window(Y - (rh - 1) / 2.0, (rh - 1) / 2.0 - edge, (rh - 1) / 2.0))
        self.mask = (mask * border).astype(np.float32)
        # Columns of the mouth (for painting the opening).
        self.mx1 = int(max(0, np.floor(cx - hw * (1 + MAX_SPREAD) - 2)))
        self.mx2 = int(min(rw, np.ceil(cx + hw * (1 + MAX_SPREAD) + 3)))
        # Colours of the inside of the mouth, from the lips.
        lip = np.array(g.lip_bgr, dtype=np.float32)
        skin = np.array(g.skin_bgr, dtype=np.float32)
        grey = float(lip.mean())
        self.dark = np.clip(0.2 * lip + 3.0, 0, 255)                 # throat
        self.inner = np.clip(0.5 * lip, 0, 255)                       # wet inner lip
        self.rim = np.clip(0.85 * lip, 0, 255)                        # lower lip's inner rim
        # Teeth: a little lighter than the skin, with a trace of its hue (grey
        # on a greyscale photo), never glossy white.
        level = float(np.clip(1.08 * max(grey, float(skin.mean())) + 12.0, 60.0, 225.0))
        warm = np.array([-6.0, 0.0, 5.0]) * float(np.ptp(skin) > 12)  # ivory, not blue-white
        self.teeth = np.clip(level + 0.55 * (skin - skin.mean()) + warm, 0, 255).astype(np.float32)
        self.tongue = np.clip(0.62 * lip, 0, 255)
        # Softness of the painted lip edges: as blurred as the photo itself.
        self.aa = float(np.clip(2.0 * g.blur, 1.0, max(1.0, 0.015 * bh)))
        self.teeth_h = 0.03 * bh
        # Shared by concurrent requests: nothing may write to these.
        for value in vars(self).values():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    # ------------------------------------------------------------------

    def render(self, open_: float, wide: float, source: np.ndarray | None = None) -> np.ndarray:
        """The region with the mouth ``open_`` in [0, 1] and ``wide`` in [-1, 1], drawn on
        ``source`` ((region.height, region.width, 3) BGR: another frame of a video avatar,
        its face where it is on the prepared one) or on the prepared avatar itself."""
        return self.draw(self.shape(open_, wide), self.source if source is None else source)

    def shape(self, open_: float, wide: float) -> MouthShape | None:
        """Everything about one mouth state that does not depend on the picture (the warp and
        the painted opening), for ``draw``; None for the mouth at rest."""
        state = self.state(open_, wide)
        if state is None:
            return None
        k = state.k
        map_x = self.base_x + k * self.side if k != 0.0 else self.base_x
        if k != 0.0 and self.side_band is not None:
            low, up = self._fields_moved_sideways(map_x)
        else:
            low, up = self.low, self.up
        # One remap: above the middle of the opening the upper-lip field, below it the jaw.
        below = self.base_y >= self._split(state.ys)
        map_y = np.where(below, self.base_y - state.drop * low, self.base_y + state.lift * up).astype(np.float32)
        opening = self._opening(state.yu, state.yl, state.open, state.wide) if state.open > 0.0 else None
        return MouthShape(map_x=map_x, map_y=map_y, opening=opening)

    def state(self, open_: float, wide: float) -> MouthState | None:
        """One mouth state's scalars and the opening's edges per mouth column (``MouthState``):
        what ``shape`` turns into maps and paint, here and on a GPU (``device_mouth.DeviceMouth``).
        None for the mouth at rest."""
        o = float(np.clip(open_, 0.0, 1.0))
        w = float(np.clip(wide, -1.0, 1.0))
        if o <= 0.0 and w == 0.0:
            return None
        drop = o * self.max_drop
        lift = o * self.max_lift
        k = -w * (MAX_SPREAD if w > 0 else MAX_ROUND)  # > 0 squeezes (rounded), < 0 spreads
        # Opening edges per column, in output coordinates.
        cols = np.arange(self.mx1, self.mx2, dtype=np.float32)
        line_row = np.clip(np.round(self.line[self.mx1:self.mx2]).astype(np.int64), 0, self.base_y.shape[0] - 1)
        src_x = cols + k * self.side[line_row, np.arange(self.mx1, self.mx2)] if k != 0.0 else cols
        lens = _lens((src_x - self.cx) / self.geometry.half_width, self.geometry.inner).astype(np.float32)
        line = np.interp(src_x, np.arange(self.line.size), self.line).astype(np.float32)
        yu = line - lift * lens
        yl = line + drop * lens
        return MouthState(open=o, wide=w, k=k, drop=drop, lift=lift, yu=yu, yl=yl, ys=0.5 * (yu + yl))

    def draw(self, shape: MouthShape | None, source: np.ndarray) -> np.ndarray:
        """``shape`` drawn on ``source`` ((region.height, region.width, 3) uint8 BGR); a new array."""
        if shape is None:
            return source.copy()
        out = cv2.remap(source, shape.map_x, shape.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if shape.opening is not None:
            r1, r2, alpha, colour = shape.opening
            sub = out[r1:r2, self.mx1:self.mx2].astype(np.float32)
            out[r1:r2, self.mx1:self.mx2] = np.clip(sub * (1 - alpha) + colour + 0.5, 0, 255).astype(np.uint8)
        return out

    def _fields_moved_sideways(self, map_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The jaw and upper-lip fields resampled at ``map_x``, only inside ``side_band``
        (elsewhere map_x is the identity and the fields are unchanged)."""
        y1, y2, x1, x2 = self.side_band
        # map_x is absolute: shift it into the band's own coordinates.
        mx = map_x[y1:y2, x1:x2] - np.float32(x1)
        my = self.base_y[y1:y2, x1:x2] - np.float32(y1)
        out = []
        for field_ in (self.low, self.up):
            moved = field_.copy()
            moved[y1:y2, x1:x2] = cv2.remap(field_[y1:y2, x1:x2], mx, my, cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_REPLICATE)
            out.append(moved)
        return out[0], out[1]

    def _split(self, ys: np.ndarray) -> np.ndarray:
        split = self.line.copy()
        split[self.mx1:self.mx2] = ys
        return split[None, :]

    def opening_rows(self, yu: np.ndarray, yl: np.ndarray) -> tuple[int, int] | None:
        """The region rows (r1, r2) the opening between edges ``yu`` and ``yl`` is painted on;
        None when the lips barely part."""
        if float((yl - yu).max()) <= 0.05:
            return None
        r1 = int(max(0, np.floor(yu.min() - 2)))
        r2 = int(min(self.base_y.shape[0], np.ceil(yl.max() + 3)))
        return (r1, r2) if r2 > r1 else None

    def _opening(self, yu, yl, o: float, w: float = 0.0):
        """The painted inside of the mouth: (r1, r2, alpha (r2-r1, cols, 1), alpha * colour), rows
        r1..r2 of the mouth's columns; None when the lips barely part."""
        rows = self.opening_rows(yu, yl)
        if rows is None:
            return None
        r1, r2 = rows
        gap = yl - yu
        Y = np.arange(r1, r2, dtype=np.float32)[:, None]
        aa = self.aa
        du = Y - yu[None, :]  # px below the upper lip edge
        dl = yl[None, :] - Y  # px above the lower lip edge
        g = gap[None, :]
        # Coverage of the opening (soft lip edges); thin slits only darken.
        alpha = np.clip(du / aa + 0.5, 0, 1) * np.clip(dl / aa + 0.5, 0, 1)
        alpha *= np.clip(g / (2.0 * aa), 0.0, 1.0) ** 0.5
        t = (np.arange(self.mx1, self.mx2, dtype=np.float32) - self.cx) / self.geometry.half_width
        at = np.abs(t)[None, :]
        # Dark throat, the wet inner side of the lips towards both edges.
        band = 1.0 * aa + 0.12 * g
        wl = np.exp(-np.clip(dl, 0, None) / band)[..., None]
        wu = np.exp(-np.clip(du, 0, None) / (0.7 * band))[..., None]
        col = self.dark[None, None, :] * (1 - wl) + self.inner[None, None, :] * wl
        col = col * (1 - wu) + (0.7 * self.inner)[None, None, :] * wu
        # The lower lip's inner rim rolls into view as the jaw drops: a band of lip
        # colour along the bottom edge, so the opening reads as lips apart, not a shadow.
        rim_w = np.clip(0.22 * g, 0.0, 0.6 * self.geometry.lower) * smoothstep(0.1, 0.5, o)
        rim = (1.0 - smoothstep(0.5 * rim_w, rim_w + aa, dl)) * (rim_w > 0.5)
        col = col * (1 - rim[..., None]) + self.rim[None, None, :] * rim[..., None]
        # Tongue: a rounded reddish mass low in a wide opening, lit from the front.
        tongue_amt = smoothstep(0.35, 0.85, o) * 0.75
        if tongue_amt > 0:
            th = 0.42 * g * np.clip(1.0 - (t / 0.75) ** 2, 0.0, 1.0)[None, :] ** 0.5
            tg = smoothstep(-aa, 1.5 * aa + 0.1 * g, th - dl) * tongue_amt
            shade = (0.65 + 0.35 * smoothstep(0.0, 1.0, 1.0 - dl / np.maximum(th, 1e-3)))[..., None]
            col = col * (1 - tg[..., None]) + (self.tongue[None, None, :] * shade) * tg[..., None]
        # Upper teeth: a band right under the upper lip, receding at the sides.
        teeth_amt = smoothstep(0.1, 0.5, o) * (1.0 - 0.3 * max(0.0, -w))  # rounded lips hide some
        if self.geometry.teeth:
            teeth_amt = 0.0  # the photo's own teeth move with the lips; painted ones would double them
        if teeth_amt > 0:
            tb = np.minimum(self.teeth_h * (0.4 + 0.6 * teeth_amt), 0.4 * g) \
                * np.clip(1.0 - (t / 0.72) ** 4, 0.0, 1.0)[None, :] ** 0.5
            ta = (1.0 - smoothstep(tb - aa, tb + aa, du)) * (tb > 0.5)
            ta = ta * teeth_amt * 0.7
            light = (0.8 + 0.2 * np.clip(1.0 - at / 0.72, 0, 1)) \
                * (1.0 - 0.25 * smoothstep(0.0, 1.0, du / np.maximum(tb, 1e-3)))
            light = light * (0.75 + 0.25 * smoothstep(0.0, 1.5 * aa, du))  # lip shadow
            col = col * (1 - ta[..., None]) + (self.teeth[None, None, :] * light[..., None]) * ta[..., None]
        col = col * (1.0 - 0.45 * np.clip(at, 0, 1) ** 2)[..., None]  # darker towards the corners
        a = alpha[..., None].astype(np.float32)
        return r1, r2, a, (col * a).astype(np.float32)
