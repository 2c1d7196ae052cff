"""Image operations in torch that give what OpenCV gives, bit for bit, on any device.

``remap_linear`` samples 8-bit images as ``cv2.remap(INTER_LINEAR, BORDER_REPLICATE)`` of
OpenCV 4 does (coordinates rounded to 1/32 pixel, integer weights, ``(sum + 512) >> 10``);
``i420`` converts BGR to I420 as ``cv2.cvtColor(COLOR_BGR2YUV_I420)`` does (BT.601 limited
range, OpenCV's integer coefficients, chroma from the top-left pixel of each 2x2 block). Used
where frames are made on a GPU (``lipsync.media.gpu_frames``, the built-in engine's mouth).
"""

from __future__ import annotations

import torch

# cv2's RGB -> YUV420p fixed point (ITU-R BT.601, limited range; modules/imgproc color_yuv).
_SHIFT = 20
_CRY, _CGY, _CBY = 269484, 528482, 102760
_CRU, _CGU, _CBU = -155188, -305135, 460324
_CGV, _CBV = -385875, -74448
_LANE, _LANE_MASK = 21, (1 << 21) - 1  # remap_linear's packed channels


def i420(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 BGR, H and W even -> (B, H * 3 // 2, W) uint8 I420, exactly as
    ``cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)`` for each frame."""
    n, h, w, _ = frames.shape
    bgr = frames.to(torch.int32)
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    half = 1 << (_SHIFT - 1)
    y = (_CRY * r + _CGY * g + _CBY * b + (half + (16 << _SHIFT))) >> _SHIFT
    b, g, r = b[:, ::2, ::2], g[:, ::2, ::2], r[:, ::2, ::2]
    u = (_CRU * r + _CGU * g + _CBU * b + (half + (128 << _SHIFT))) >> _SHIFT
    v = (_CBU * r + _CGV * g + _CBV * b + (half + (128 << _SHIFT))) >> _SHIFT
    out = torch.empty((n, h * 3 // 2, w), dtype=torch.uint8, device=frames.device)
    out[:, :h] = y.clamp_(0, 255)
    chroma = out[:, h:].view(n, 2, h // 2, w // 2)
    chroma[:, 0] = u.clamp_(0, 255)
    chroma[:, 1] = v.clamp_(0, 255)
    return out


def remap_linear(src: torch.Tensor, map_x: torch.Tensor, map_y: torch.Tensor) -> torch.Tensor:
    """(B, h, w, 3) uint8 sampled at float32 (B, h, w) maps: ``cv2.remap(src, map_x, map_y,
    INTER_LINEAR, borderMode=BORDER_REPLICATE)`` for 8-bit images, bit for bit."""
    n, h, w, c = src.shape
    qx = torch.round(map_x * 32).to(torch.int32)  # cvRound(x * INTER_TAB_SIZE): half to even
    qy = torch.round(map_y * 32).to(torch.int32)
    x0, fx = qx >> 5, qx & 31
    y0, fy = qy >> 5, qy & 31
    x1, y1 = (x0 + 1).clamp_(0, w - 1), (y0 + 1).clamp_(0, h - 1)
    x0, y0 = x0.clamp_(0, w - 1), y0.clamp_(0, h - 1)
    # The three channels of a pixel in one int64, 21 bits apart: a channel's weighted sum is at
    # most 255 * 1024 < 2**18, so the four taps add up without one channel reaching the next,
    # and each tap is one gather instead of three.
    pixels = src.to(torch.int64)
    packed = (pixels[..., 0] | (pixels[..., 1] << _LANE) | (pixels[..., 2] << 2 * _LANE)).reshape(n, h * w)

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return torch.gather(packed, 1, (yi.to(torch.int64) * w + xi).reshape(n, h * w)).reshape(n, h, w)

    gx, gy = 32 - fx, 32 - fy
    total = tap(y0, x0) * (gx * gy) + tap(y0, x1) * (fx * gy) + tap(y1, x0) * (gx * fy) + tap(y1, x1) * (fx * fy)
    lanes = torch.stack([(total >> (_LANE * k)) & _LANE_MASK for k in range(c)], -1)
    return ((lanes + 512) >> 10).to(torch.uint8)  # weights sum to 1024: at most 255
