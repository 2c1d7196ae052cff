"""The built-in engine's mouth states drawn with torch, a batch of states at once, on any device
(a CUDA GPU in production; torch's CPU device in tests, which compare it with the CPU path).

``DeviceMouth(renderer, device).draw(states)`` gives what ``MouthRenderer.draw(shape(...),
source)`` gives for each state, with the same arithmetic:

* the warp's maps in float32 as NumPy computes them (``map_x = X + k * side``; the jaw and
  upper-lip fields resampled sideways as ``cv2.remap`` samples float images: coordinates rounded
  to 1/32 pixel, float weights; ``map_y`` switching from lip to jaw at the opening's middle),
  then the photo sampled as ``cv2.remap`` samples 8-bit images (``torch_image.remap_linear``);
* the painted opening with the same formulas, each step in the precision NumPy gives it (float32
  or float64; NumPy's ``x ** 0.5`` is its ``sqrt``, and the per-column powers are NumPy's own);
  only ``exp`` rounds differently, so a painted pixel may be one level (1/255) apart.

Per state, the scalars and the opening's edges per mouth column (``MouthRenderer.state``: a few
hundred numbers) are worked out on the host by the CPU path's own code and uploaded in one copy
per batch; the per-column constants of the paint are computed once, by NumPy, and uploaded.
"""

from __future__ import annotations

import numpy as np
import torch

from lipsync.engines.blend import smoothstep
from lipsync.engines.builtin.mouth import MouthRenderer, MouthState
from lipsync.media.torch_image import remap_linear, upload

_SCALARS = 8  # per state: k, drop, lift, rim, tongue, teeth amounts, first/last painted row


def _smoothstep(edge0, edge1, x: torch.Tensor) -> torch.Tensor:
    """``blend.smoothstep`` on tensors, in the precision NumPy gives it: with float edges its
    ``np.maximum(edge1 - edge0, 1e-9)`` is a float64 scalar, so the steps after ``x - edge0`` are
    float64; with tensor edges, the tensors' precision."""
    if isinstance(edge1, torch.Tensor):
        t = (x - edge0) / torch.clamp(edge1 - edge0, min=1e-9)
    else:
        t = (x - edge0).to(torch.float64) / max(edge1 - edge0, 1e-9)
    t = t.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class DeviceMouth:
    """One request's mouth drawing on ``device``: the renderer's read-only fields uploaded once."""

    def __init__(self, renderer: MouthRenderer, device: torch.device | str):
        self.renderer = r = renderer
        self.device = torch.device(device)
        g = r.geometry
        self.source = upload(r.source, self.device)
        self.base_x, self.base_y = upload(r.base_x, self.device), upload(r.base_y, self.device)
        self.side = upload(r.side, self.device)
        self.fields = upload(np.stack([r.low, r.up]), self.device)  # (2, h, w): jaw, upper lip
        self.line = upload(r.line, self.device)
        # Per mouth column, as ``MouthRenderer._opening`` computes them (float32).
        t = (np.arange(r.mx1, r.mx2, dtype=np.float32) - r.cx) / g.half_width
        at = np.abs(t)
        columns = np.stack([
            t,
            np.clip(1.0 - (t / 0.75) ** 2, 0.0, 1.0) ** 0.5,            # the tongue's profile
            np.clip(1.0 - (t / 0.72) ** 4, 0.0, 1.0) ** 0.5,            # the teeth's profile
            0.8 + 0.2 * np.clip(1.0 - at / 0.72, 0, 1),                 # the teeth's light
            1.0 - 0.45 * np.clip(at, 0, 1) ** 2,                        # darker towards the corners
        ]).astype(np.float32)
        self.columns = upload(columns, self.device)[:, None, None, :]          # (5, 1, 1, cols)
        colours = np.stack([r.dark, r.inner, 0.7 * r.inner, r.rim, r.tongue, r.teeth]).astype(np.float32)
        self.colours = upload(colours, self.device)                            # (6, 3)

    def draw(self, states: list[MouthState | None]) -> torch.Tensor:
        """(n, region.height, region.width, 3) uint8 BGR on the device: ``states[i]`` (from
        ``MouthRenderer.state``; None: the mouth at rest) drawn on the prepared avatar."""
        r = self.renderer
        n, cols = len(states), r.mx2 - r.mx1
        packed = np.zeros((n, _SCALARS + 3 * cols), np.float64)
        rest_line = r.line[r.mx1:r.mx2]
        for i, state in enumerate(states):
            if state is None:
                packed[i, _SCALARS:] = np.concatenate([rest_line, rest_line, rest_line])
                continue
            rows = r.opening_rows(state.yu, state.yl) if state.open > 0.0 else None
            teeth = 0.0 if r.geometry.teeth else smoothstep(0.1, 0.5, state.open) * (1.0 - 0.3 * max(0.0, -state.wide))
            packed[i, :_SCALARS] = (state.k, state.drop, state.lift, smoothstep(0.1, 0.5, state.open),
                                    smoothstep(0.35, 0.85, state.open) * 0.75, teeth, *(rows or (0, 0)))
            packed[i, _SCALARS:] = np.concatenate([state.yu, state.yl, state.ys])
        values = upload(packed, self.device)
        # Python floats meet NumPy's float32 arrays as float32: the same here.
        k, drop, lift = (values[:, j].to(torch.float32)[:, None, None] for j in range(3))
        yu, yl, ys = values[:, _SCALARS:].to(torch.float32).view(n, 3, cols).unbind(1)
        map_x = self.base_x + k * self.side
        low, up = self._fields_moved_sideways(map_x)
        split = self.line.expand(n, -1).clone()
        split[:, r.mx1:r.mx2] = ys
        below = self.base_y >= split[:, None, :]
        map_y = torch.where(below, self.base_y - drop * low, self.base_y + lift * up)
        out = remap_linear(self.source.expand(n, -1, -1, -1), map_x, map_y)
        painted = packed[:, 7] > packed[:, 6]  # on the host: asking the device would wait for it
        if painted.any():
            rows = int(packed[painted, 6].min()), int(packed[painted, 7].max())
            self._paint(out, rows, values[:, 3:8], yu, yl)
        return out

    def _fields_moved_sideways(self, map_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``MouthRenderer._fields_moved_sideways`` for every state: inside ``side_band`` the
        fields sampled at ``map_x`` (its rows are whole pixels, so only the horizontal taps
        weigh: value0 * (1 - a) + value1 * a with a in 1/32, as cv2.remap's float path)."""
        r = self.renderer
        n = len(map_x)
        fields = self.fields.unsqueeze(0).expand(n, -1, -1, -1)
        if r.side_band is None:
            return fields[:, 0], fields[:, 1]
        y1, y2, x1, x2 = r.side_band
        q = torch.round((map_x[:, y1:y2, x1:x2] - x1) * 32).to(torch.int32)
        x0, a = q >> 5, (q & 31).to(torch.float32) / 32
        width = x2 - x1
        x1i = (x0 + 1).clamp_(0, width - 1).to(torch.int64).unsqueeze(1).expand(-1, 2, -1, -1)
        x0i = x0.clamp_(0, width - 1).to(torch.int64).unsqueeze(1).expand(-1, 2, -1, -1)
        band = self.fields[:, y1:y2, x1:x2].unsqueeze(0).expand(n, -1, -1, -1)
        a = a.unsqueeze(1)
        moved = torch.gather(band, 3, x0i) * (1 - a) + torch.gather(band, 3, x1i) * a
        fields = fields.clone()
        fields[:, :, y1:y2, x1:x2] = moved
        return fields[:, 0], fields[:, 1]

    def _paint(self, out: torch.Tensor, rows: tuple[int, int], amounts: torch.Tensor, yu: torch.Tensor,
               yl: torch.Tensor) -> None:
        """``MouthRenderer._opening`` and ``draw``'s paint of every state at once on ``rows``
        (r1, r2: all rows any state paints), each state on its own rows (``amounts[:, 3:5]``)
        only: elsewhere alpha is 0 and the pixel stays as it is, as on the CPU."""
        r = self.renderer
        aa, lower = r.aa, r.geometry.lower
        first, last = amounts[:, 3], amounts[:, 4]
        r1, r2 = rows
        f64 = torch.float64
        rows = torch.arange(r1, r2, dtype=torch.float32, device=self.device)[None, :, None]
        yu, yl = yu[:, None, :], yl[:, None, :]
        du, dl, g = rows - yu, yl - rows, yl - yu                         # float32, as NumPy's
        alpha = (du / aa + 0.5).clamp(0, 1) * (dl / aa + 0.5).clamp(0, 1)
        alpha = alpha * (g / (2.0 * aa)).clamp(0.0, 1.0).sqrt()
        inside = (rows >= first[:, None, None]) & (rows < last[:, None, None])
        alpha = torch.where(inside, alpha, 0.0)
        t, tongue_profile, teeth_profile, teeth_light, corners = self.columns
        dark, inner, inner_lit, rim_c, tongue_c, teeth_c = self.colours
        band = 1.0 * aa + 0.12 * g
        wl = torch.exp(-dl.clamp(min=0) / band)[..., None]
        wu = torch.exp(-du.clamp(min=0) / (0.7 * band))[..., None]
        col = dark * (1 - wl) + inner * wl
        col = col * (1 - wu) + inner_lit * wu
        rim_amount, tongue_amount, teeth_amount = (amounts[:, j, None, None] for j in range(3))
        rim_w = (0.22 * g).clamp(0.0, 0.6 * lower).to(f64) * rim_amount
        rim = (1.0 - _smoothstep(0.5 * rim_w, rim_w + aa, dl.to(f64))) * (rim_w > 0.5)
        col = col * (1 - rim[..., None]) + rim_c * rim[..., None]
        # The tongue and teeth of states without them weigh 0: their colour stays as it is.
        th = 0.42 * g * tongue_profile
        tg = _smoothstep(-aa, 1.5 * aa + 0.1 * g, th - dl) * tongue_amount
        shade = (0.65 + 0.35 * _smoothstep(0.0, 1.0, (1.0 - dl / th.clamp(min=1e-3)).to(f64)))[..., None]
        col = col * (1 - tg[..., None]) + (tongue_c * shade) * tg[..., None]
        tb = torch.minimum(r.teeth_h * (0.4 + 0.6 * teeth_amount), (0.4 * g).to(f64)) * teeth_profile
        ta = (1.0 - _smoothstep(tb - aa, tb + aa, du.to(f64))) * (tb > 0.5)
        ta = ta * teeth_amount * 0.7
        light = teeth_light * (1.0 - 0.25 * _smoothstep(0.0, 1.0, du / tb.clamp(min=1e-3)))
        light = light * (0.75 + 0.25 * _smoothstep(0.0, 1.5 * aa, du.to(f64)))
        col = col * (1 - ta[..., None]) + (teeth_c * light[..., None]) * ta[..., None]
        col = col * corners[..., None]
        a = alpha[..., None]
        colour = (col * a).to(torch.float32)
        sub = out[:, r1:r2, r.mx1:r.mx2].to(torch.float32)
        out[:, r1:r2, r.mx1:r.mx2] = (sub * (1 - a) + colour + 0.5).clamp_(0, 255).to(torch.uint8)
