"""A photo that lives: blinks, a slow head sway and breathing, drawn over every frame.

``prepare_idle(image, box, landmarks)`` (once per avatar) builds an ``IdleRig``: the
region around head and shoulders that moves, smooth weights for the head and the chest,
and the eyes' lids from the face mesh. ``idle_track(n, fps, seed, mouth_open)`` plans the
motion of a whole video, deterministically from ``seed``:

* blinks every 2-6 s, 150-250 ms each (40 % closing, 60 % opening), moved off frames
  where the mouth changes a lot (a blink on the same frame as a jaw drop reads as a
  twitch);
* head sway: two slow sines per axis (periods 5-11 s), about 1.2 % of the face's height
  sideways (2-3 px at 720p), 0.6 % up and down and 0.6 degree of roll;
* breathing: a 3.5-4.5 s cycle lifting the chest and, less, the head;
* eyebrows a touch up (about 1 % of the face's height) on some stressed syllables (loudness
  peaks at least 1.5 s apart), rising just before the peak and settling over 0.3 s.

``apply_idle(frame, rig, track, i)`` draws frame ``i``: one ``cv2.remap`` of the rig's
region. Displacements fade to nothing before the region's edge, so the background and
the frame's border never move; everything inside moves together (the mouth the engine
pasted included), so lips and face never separate.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lipsync.engines.blend import smoothstep
from lipsync.faces.box import FaceBox, Rect

BLINK_EVERY_S = (2.0, 6.0)
BLINK_LENGTH_S = (0.15, 0.25)
BLINK_CLOSING = 0.4            # share of a blink spent closing
SWAY_X, SWAY_Y = 0.012, 0.006  # amplitudes, fractions of the face box height (2-3 px at 720p)
SWAY_ROLL_DEG = 0.6
BREATH_PERIOD_S = (3.5, 4.5)
BREATH_CHEST = 0.01            # chest lift, fraction of the face box height
BREATH_HEAD = 0.004
BROW_RAISE = 0.011             # eyebrow lift at its top, fraction of the face box height
BROW_GAP_S = 1.5               # at least this long between two raises
BROW_SHARE = 0.6               # share of the stressed syllables that get one

# Eyebrows in the face mesh: (upper edge points, lower edge points), the subject's right then left.
_BROWS = (((70, 63, 105, 66, 107), (46, 53, 52, 65, 55)),
          ((300, 293, 334, 296, 336), (276, 283, 282, 295, 285)))
# Eyes in the face mesh: (outer corner, inner corner, upper lid points, lower lid points).
_EYES = ((33, 133, (160, 159, 158), (144, 145, 153)),
         (263, 362, (387, 386, 385), (373, 374, 380)))


@dataclass(frozen=True)
class Eye:
    """One eye, image pixels: corners, lid heights at its middle."""

    x1: float
    x2: float
    upper: float   # upper lid at the middle
    lower: float   # lower lid at the middle

    @property
    def cx(self) -> float:
        return 0.5 * (self.x1 + self.x2)


@dataclass(frozen=True)
class IdleRig:
    """Per-avatar idle-motion data (read-only, shared by requests)."""

    region: Rect             # the part of the frame that moves
    head: np.ndarray         # (h, w) float32 weight of the head's motion in ``region``
    chest: np.ndarray        # (h, w) float32 weight of breathing's lift
    pivot: tuple[float, float]  # roll centre (the neck), region pixels
    face_height: float       # pixels
    eyes: tuple[Eye, ...]
    blink_field: np.ndarray  # (h, w) float32: how far (in lid travels) each pixel samples upwards at a closed blink
    brow_field: np.ndarray   # (h, w) float32: share of the brow raise each pixel moves up by
    grid: tuple[np.ndarray, np.ndarray]  # (xx, yy) float32 pixel coordinates of the region
    head_grid: tuple[np.ndarray, np.ndarray]  # (head * xx, head * yy), precomputed for apply_idle

    def __getstate__(self) -> dict:
        # The grids are half the rig's size and cheap to make again: not stored.
        state = dict(self.__dict__)
        state.pop("grid"), state.pop("head_grid")
        return state

    def __setstate__(self, state: dict) -> None:
        h, w = state["head"].shape
        xx, yy = (np.ascontiguousarray(a) for a in np.meshgrid(np.arange(w, dtype=np.float32),
                                                               np.arange(h, dtype=np.float32)))
        state = {**state, "grid": (xx, yy), "head_grid": (state["head"] * xx, state["head"] * yy)}
        for key, value in state.items():
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class IdleTrack:
    """Per-frame motion: ``dx``, ``dy`` (px), ``roll`` (radians), ``breath``, ``blink`` and
    ``brow`` (0..1; None: no eyebrow motion)."""

    dx: np.ndarray
    dy: np.ndarray
    roll: np.ndarray
    breath: np.ndarray
    blink: np.ndarray
    brow: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.dx.shape[0])


def prepare_idle(image: np.ndarray, box: FaceBox, landmarks=None) -> IdleRig:
    """The rig for ``image`` (H, W, 3) with its face in ``box``; ``landmarks`` (a
    ``lipsync.faces.landmarks.Landmarks``) place the eyes, without them there are no blinks."""
    h_img, w_img = image.shape[:2]
    fw, fh = float(box.width), float(box.height)
    cx, cy = box.x1 + 0.5 * fw, box.y1 + 0.5 * fh
    region = Rect(int(max(0, cx - 1.3 * fw)), int(max(0, box.y1 - 0.6 * fh)),
                  int(min(w_img, cx + 1.3 * fw)), int(min(h_img, box.y2 + 1.1 * fh))).clip(w_img, h_img)
    rh, rw = region.height, region.width
    yy, xx = np.mgrid[0:rh, 0:rw].astype(np.float32)
    x, y = xx + region.x1, yy + region.y1
    # The head: a soft ellipse around the face and hair, the neck below it.
    ex, ey = 0.85 * fw, 0.95 * fh
    d_head = np.sqrt(((x - cx) / ex) ** 2 + ((y - (cy - 0.05 * fh)) / ey) ** 2)
    head = 1.0 - smoothstep(0.8, 1.35, d_head)
    neck = (1.0 - smoothstep(0.35 * fw, 0.6 * fw, np.abs(x - cx))) * (1.0 - smoothstep(box.y2, box.y2 + 0.6 * fh, y))
    head = np.maximum(head, 0.8 * neck * (y > cy))
    # The chest: below the chin, wide, fading towards the region's bottom.
    chest = smoothstep(box.y2 - 0.1 * fh, box.y2 + 0.3 * fh, y) * (1.0 - smoothstep(1.1 * fw, 1.3 * fw, np.abs(x - cx)))
    # Nothing at the region's border moves.
    edge = max(4.0, 0.06 * min(rh, rw))
    border = (smoothstep(0, edge, xx) * smoothstep(0, edge, rw - 1 - xx)
              * smoothstep(0, edge, yy) * smoothstep(0, edge, rh - 1 - yy))
    eyes: tuple[Eye, ...] = ()
    blink = np.zeros((rh, rw), np.float32)
    brow = np.zeros((rh, rw), np.float32)
    if landmarks is not None:
        eyes = tuple(_eye(landmarks.points, *spec) for spec in _EYES)
        for eye in eyes:
            blink = np.maximum(blink, _blink_field(eye, x, y))
        for (upper, lower), eye in zip(_BROWS, eyes):
            brow = np.maximum(brow, _brow_field(landmarks.points[list(upper)], landmarks.points[list(lower)],
                                                eye, x, y))
    head, chest, blink, brow = ((a * border).astype(np.float32) for a in (head, chest, blink, brow))
    # Work only where something moves: the weights' bounding box (outside it the remap is the identity).
    rows, cols = np.nonzero((head > 1e-4) | (chest > 1e-4) | (blink > 1e-4))
    if rows.size:
        y1, y2 = max(0, int(rows.min()) - 1), min(head.shape[0], int(rows.max()) + 2)
        x1, x2 = max(0, int(cols.min()) - 1), min(head.shape[1], int(cols.max()) + 2)
        head, chest, blink, brow = (np.ascontiguousarray(a[y1:y2, x1:x2]) for a in (head, chest, blink, brow))
        region = Rect(region.x1 + x1, region.y1 + y1, region.x1 + x2, region.y1 + y2)
    xx, yy = (np.ascontiguousarray(a) for a in np.meshgrid(np.arange(region.width, dtype=np.float32),
                                                           np.arange(region.height, dtype=np.float32)))
    return IdleRig(region=region, head=head, chest=chest,
                   pivot=(cx - region.x1, box.y2 + 0.3 * fh - region.y1), face_height=fh, eyes=eyes,
                   blink_field=blink, brow_field=brow, grid=(xx, yy), head_grid=(head * xx, head * yy))


def _eye(points: np.ndarray, outer: int, inner: int, upper: tuple, lower: tuple) -> Eye:
    a, b = points[outer], points[inner]
    return Eye(x1=float(min(a[0], b[0])), x2=float(max(a[0], b[0])),
               upper=float(np.mean(points[list(upper), 1])), lower=float(np.mean(points[list(lower), 1])))


def _blink_field(eye: Eye, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Upward sampling distance at a closed blink, in units of the eye's opening.

    Between the lids a pixel samples from one opening higher (the upper lid's skin slides
    down over the eye); above the eye the shift fades out over the lid's height towards
    the brow; below the lower lid nothing moves (the lower lid stays)."""
    half = 0.5 * (eye.x2 - eye.x1)
    opening = max(eye.lower - eye.upper, 1.0)
    across = 1.0 - smoothstep(0.8 * half, 1.25 * half, np.abs(x - eye.cx))
    below_lid = 1.0 - smoothstep(eye.lower - 0.1 * opening, eye.lower + 0.25 * opening, y)
    above = smoothstep(eye.upper - 1.4 * opening, eye.upper - 0.1 * opening, y)
    return across * below_lid * above


def _brow_field(upper: np.ndarray, lower: np.ndarray, eye: Eye, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 on the eyebrow, fading out over the forehead above it and before the eye's upper lid
    below it (the lid and the eye never move with the brow)."""
    x1, x2 = float(min(upper[:, 0].min(), lower[:, 0].min())), float(max(upper[:, 0].max(), lower[:, 0].max()))
    top, bottom = float(upper[:, 1].min()), float(lower[:, 1].max())
    height = max(bottom - top, 2.0)
    margin = 0.15 * (x2 - x1)
    across = smoothstep(x1 - 2 * margin, x1, x) * (1.0 - smoothstep(x2, x2 + 2 * margin, x))
    above = smoothstep(top - 2.5 * height, top - 0.3 * height, y)
    lid = max(eye.upper - 0.3 * (eye.lower - eye.upper), bottom + 0.2 * height)
    below = 1.0 - smoothstep(bottom + 0.2 * height, lid, y)
    return across * above * below


def idle_track(n_frames: int, fps: float, seed: int, face_height: float,
               mouth_open: np.ndarray | None = None, first: int = 0) -> IdleTrack:
    """The idle motion of frames ``first`` .. ``first + n_frames - 1`` at ``fps``: the same
    ``seed`` gives the same motion, and consecutive calls (the sentences of a long text)
    continue one another. ``mouth_open`` (one value per frame of this call, 0..1) keeps
    blinks off frames where the mouth jumps."""
    rng = np.random.default_rng(seed)
    t = (first + np.arange(n_frames)) / float(fps)
    sway = np.zeros((3, n_frames))
    for axis in range(3):
        for _ in range(2):
            period = rng.uniform(5.0, 11.0)
            sway[axis] += 0.5 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    breath_period = rng.uniform(*BREATH_PERIOD_S)
    breath = 0.5 - 0.5 * np.cos(2 * np.pi * t / breath_period + rng.uniform(0, 2 * np.pi))
    blink = np.zeros(n_frames)
    change = np.zeros(n_frames)
    if mouth_open is not None and len(mouth_open):
        change = np.abs(np.diff(mouth_open, prepend=mouth_open[:1]))
    # The blink schedule from frame 0 on (so it does not depend on where this call starts).
    start = rng.uniform(0.8, 3.0)
    end = (first + n_frames) / float(fps)
    while start < end:
        length = rng.uniform(*BLINK_LENGTH_S)
        at = int(round(start * fps)) - first  # index in this call
        # Up to 3 frames later if the mouth jumps on the blink's first frames.
        for shift in range(4):
            i = at + shift
            if not 0 <= i < n_frames or change[i:i + 2].max(initial=0.0) < 0.25:
                at = i
                break
        _add_blink(blink, at, length, fps)
        start = (first + at) / fps + length + rng.uniform(*BLINK_EVERY_S)
    brow = _brow_track(n_frames, fps, seed, first, mouth_open)
    scale = face_height
    return IdleTrack(dx=(SWAY_X * scale * sway[0]).astype(np.float32),
                     dy=(SWAY_Y * scale * sway[1] - BREATH_HEAD * scale * breath).astype(np.float32),
                     roll=np.radians(SWAY_ROLL_DEG * sway[2]).astype(np.float32),
                     breath=breath.astype(np.float32), blink=np.clip(blink, 0, 1).astype(np.float32),
                     brow=brow)


def _brow_track(n_frames: int, fps: float, seed: int, first: int, loudness: np.ndarray | None) -> np.ndarray:
    """Eyebrow raises (0..1) on some loudness peaks of this call's frames: up over 80 ms before
    the peak, held 120 ms, down over 300 ms. Which peaks get one is decided per absolute
    frame from ``seed``, so the same input gives the same brows."""
    brow = np.zeros(n_frames, np.float32)
    if loudness is None or len(loudness) != n_frames or n_frames < 3:
        return brow
    level = np.asarray(loudness, np.float64)
    last = -1e9
    t = np.arange(n_frames) / float(fps)
    for i in range(n_frames):
        lo, hi = max(0, i - 3), min(n_frames, i + 4)
        if level[i] < 0.85 or level[i] < level[lo:hi].max() or t[i] - last < BROW_GAP_S:
            continue
        last = t[i]
        if np.random.default_rng([seed, first + i]).random() > BROW_SHARE:
            continue
        u = t - t[i]
        shape = smoothstep(-0.08, 0.0, u) * (1.0 - smoothstep(0.12, 0.42, u))
        brow = np.maximum(brow, shape.astype(np.float32))
    return brow


def _add_blink(blink: np.ndarray, first: int, length_s: float, fps: float) -> None:
    """A lid closing over ``BLINK_CLOSING`` of ``length_s`` then opening, sampled at frame centres."""
    n = blink.shape[0]
    frames = max(2, int(np.ceil(length_s * fps)) + 1)
    for k in range(frames):
        i = first + k
        if not 0 <= i < n:
            continue
        u = (k + 0.5) / fps / length_s
        closing = BLINK_CLOSING
        value = smoothstep(0.0, closing, u) if u < closing else 1.0 - smoothstep(closing, 1.0, u)
        blink[i] = max(blink[i], float(value))


def motion_terms(rig: IdleRig, track: IdleTrack, i: int) -> tuple[float, ...]:
    """Frame ``i``'s remap, as the factors of ``rig``'s precomputed fields (``IDLE_TERMS``):
    ``map_x = xx + a * hx + b * hy + ex * head``; ``map_y = yy + a * hy - b * hx + ey * head +
    chest_k * chest + blink_k * blink_field + brow_k * brow_field``, added in that order in
    float32 (``apply_idle``; ``lipsync.media.gpu_frames`` adds the same). All 0: frame ``i`` is
    drawn as it is."""
    dx, dy, roll = float(track.dx[i]), float(track.dy[i]), float(track.roll[i])
    breath, blink = float(track.breath[i]), float(track.blink[i])
    brow = float(track.brow[i]) if track.brow is not None else 0.0
    if dx == dy == roll == breath == blink == brow == 0.0:
        return (0.0,) * 7
    px, py = rig.pivot
    # Inverse mapping: where each output pixel comes from. The head turns by ``roll``
    # about the neck and shifts by (dx, dy); the chest lifts by ``breath``. (An affine
    # map minus the identity: (a - 1) x + b y + e, in float32 throughout.)
    c, s = np.cos(roll), np.sin(roll)
    a, b = float(c - 1.0), float(s)
    ex = float(px - c * (px + dx) - s * (py + dy))
    ey = float(py + s * (px + dx) - c * (py + dy))
    chest = BREATH_CHEST * rig.face_height * breath if breath > 0.0 else 0.0
    lids = 0.0
    if blink > 0.0 and rig.eyes:
        lids = float(-blink * np.mean([e.lower - e.upper for e in rig.eyes]))
    brows = brow * BROW_RAISE * rig.face_height if brow > 0.0 else 0.0  # sampling from below moves the brow up
    return a, b, ex, ey, chest, lids, brows


def map_buffers(rig: IdleRig) -> tuple[np.ndarray, np.ndarray]:
    """Two (h, w) float32 arrays of ``rig``'s region for ``apply_idle(maps=)``: one caller's own
    (a request's; the rig is shared), so the maps are not allocated anew for every frame."""
    h, w = rig.head.shape
    return np.empty((h, w), np.float32), np.empty((h, w), np.float32)


def apply_idle(frame: np.ndarray, rig: IdleRig, track: IdleTrack, i: int, out: np.ndarray | None = None,
               maps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Frame ``i`` of the video with the idle motion drawn (``frame`` is not modified; the
    result is ``out`` when given, else a new array). ``maps`` (``map_buffers(rig)``) are
    overwritten with the frame's maps; without them they are allocated for this call."""
    result = out if out is not None else frame.copy()
    if out is not None and out is not frame:
        np.copyto(result, frame)
    r = rig.region
    a, b, ex, ey, chest, lids, brows = terms = motion_terms(rig, track, i)
    if not any(terms):
        return result
    xx, yy = rig.grid
    hx, hy = rig.head_grid
    map_x, map_y = maps if maps is not None else map_buffers(rig)
    # map = grid + head * (affine - identity), as OpenCV multiply-adds over precomputed terms
    # (in place: the same values as into new arrays, without a page-faulted allocation each).
    cv2.scaleAdd(hx, a, xx, dst=map_x)
    cv2.scaleAdd(hy, b, map_x, dst=map_x)
    cv2.scaleAdd(rig.head, ex, map_x, dst=map_x)
    cv2.scaleAdd(hy, a, yy, dst=map_y)
    cv2.scaleAdd(hx, -b, map_y, dst=map_y)
    cv2.scaleAdd(rig.head, ey, map_y, dst=map_y)
    for field, k in ((rig.chest, chest), (rig.blink_field, lids), (rig.brow_field, brows)):
        if k != 0.0:
            cv2.scaleAdd(field, k, map_y, dst=map_y)
    # Sampled from ``frame`` straight into ``result``'s region (a view OpenCV writes in place);
    # only when they are one array does the region need a copy first.
    source = frame[r.y1:r.y2, r.x1:r.x2]
    if result is frame:
        source = source.copy()
    target = result[r.y1:r.y2, r.x1:r.x2]
    moved = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, dst=target, borderMode=cv2.BORDER_REPLICATE)
    if not np.shares_memory(moved, target):  # an OpenCV that would not write into the view
        target[...] = moved
    return result
