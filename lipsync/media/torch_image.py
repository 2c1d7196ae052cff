"""Image operations in torch that give what OpenCV gives, bit for bit, on any device.

``remap_linear`` samples 8-bit images as ``cv2.remap(INTER_LINEAR, BORDER_REPLICATE)`` of
OpenCV 4 does (coordinates rounded to 1/32 pixel, integer weights, ``(sum + 512) >> 10``);
``i420`` converts BGR to I420 as ``cv2.cvtColor(COLOR_BGR2YUV_I420)`` does (BT.601 limited
range, OpenCV's integer coefficients, chroma from the top-left pixel of each 2x2 block). Used
where frames are made on a GPU (``lipsync.media.gpu_frames``, the built-in engine's mouth).
"""

from __future__ import annotations

import numpy as np
import torch

# cv2's RGB -> YUV420p fixed point (ITU-R BT.601, limited range; modules/imgproc color_yuv).
_SHIFT = 20
_CRY, _CGY, _CBY = 269484, 528482, 102760
_CRU, _CGU, _CBU = -155188, -305135, 460324
_CGV, _CBV = -385875, -74448


def i420(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 BGR, H and W even -> (B, H * 3 // 2, W) uint8 I420, exactly as
    ``cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)`` for each frame."""
    n, h, w, _ = frames.shape
    half = 1 << (_SHIFT - 1)

    def plane(bgr: torch.Tensor, cr: int, cg: int, cb: int, offset: int) -> torch.Tensor:
        # int32 fixed point, one pass per term (add with alpha), read straight from the uint8 pixels
        acc = bgr[..., 2].to(torch.int32).mul_(cr)
        acc.add_(bgr[..., 1], alpha=cg).add_(bgr[..., 0], alpha=cb).add_(half + (offset << _SHIFT))
        return acc.bitwise_right_shift_(_SHIFT).clamp_(0, 255)

    out = torch.empty((n, h * 3 // 2, w), dtype=torch.uint8, device=frames.device)
    out[:, :h] = plane(frames, _CRY, _CGY, _CBY, 16)
    corners = frames[:, ::2, ::2]
    chroma = out[:, h:].view(n, 2, h // 2, w // 2)
    chroma[:, 0] = plane(corners, _CRU, _CGU, _CBU, 128)
    chroma[:, 1] = plane(corners, _CBU, _CGV, _CBV, 128)
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
    row0, row1 = y0 * w, y1 * w
    flat = src.reshape(n, h * w, c)

    def tap(row: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:  # uint8, as the image holds it
        index = (row + xi).reshape(n, h * w, 1).expand(n, h * w, c)
        return torch.gather(flat, 1, index).reshape(n, h, w, c)

    # OpenCV's integer weights (1/32 steps, summing to 1024) and sum, in float32: every product
    # (at most 255 * 1024) and sum is an integer below 2**24, so exact, and each step of the sum
    # is one addcmul over the pixels instead of a multiply and an add.
    fx, fy = fx.to(torch.float32).unsqueeze(-1), fy.to(torch.float32).unsqueeze(-1)
    gx, gy = 32 - fx, 32 - fy
    total = tap(row0, x0) * (gx * gy)
    total.addcmul_(tap(row0, x1), fx * gy).addcmul_(tap(row1, x0), gx * fy).addcmul_(tap(row1, x1), fx * fy)
    # (sum + 512) >> 10: the division by 1024 is exact and the conversion truncates (>= 0).
    return total.add_(512).mul_(1 / 1024).to(torch.uint8)


def upload(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``data`` on ``device`` (as it is when already there). To a CUDA device from the host
    through pinned memory, without waiting for the GPU's queued work (a copy from pageable memory
    would); read-only NumPy arrays are copied first (torch cannot wrap them)."""
    tensor = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.require(data, requirements=["C", "W"]))
    if tensor.device == device:
        return tensor
    pin = device.type == "cuda" and tensor.device.type == "cpu"
    if pin:
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=pin)
