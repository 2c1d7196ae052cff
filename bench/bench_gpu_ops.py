"""The GPU frame path's two big operations, round 3's code against this tree's, on one device:
``remap_linear`` (the idle motion's remap of a chunk of frames) and ``i420``; each must give
the same bits.

    python3 bench/bench_gpu_ops.py [--device cuda] [--frames 64] [--height 1246] [--width 1084]

The remap runs over the idle rig's region of avatar.jpg at that size (936x1009 at 1246 lines).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.media.torch_image import i420, remap_linear  # noqa: E402

_SHIFT = 20


def remap_round3(src, map_x, map_y):
    """remap_linear as of aed4c52: int32 taps through an expanded index, seven passes to sum."""
    n, h, w, c = src.shape
    qx = torch.round(map_x * 32).to(torch.int32)
    qy = torch.round(map_y * 32).to(torch.int32)
    x0, fx = qx >> 5, qx & 31
    y0, fy = qy >> 5, qy & 31
    x1, y1 = (x0 + 1).clamp_(0, w - 1), (y0 + 1).clamp_(0, h - 1)
    x0, y0 = x0.clamp_(0, w - 1), y0.clamp_(0, h - 1)
    flat = src.reshape(n, h * w, c).to(torch.int32)

    def tap(yi, xi):
        index = (yi * w + xi).reshape(n, h * w, 1).expand(n, h * w, c)
        return torch.gather(flat, 1, index).reshape(n, h, w, c)

    gx, gy = (32 - fx).unsqueeze(-1), (32 - fy).unsqueeze(-1)
    fx, fy = fx.unsqueeze(-1), fy.unsqueeze(-1)
    total = tap(y0, x0) * (gx * gy) + tap(y0, x1) * (fx * gy) + tap(y1, x0) * (gx * fy) + tap(y1, x1) * (fx * fy)
    return ((total + 512) >> 10).clamp_(0, 255).to(torch.uint8)


def i420_round3(frames):
    """i420 as of aed4c52: the whole frame to int32 first, one pass per operator."""
    n, h, w, _ = frames.shape
    bgr = frames.to(torch.int32)
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    half = 1 << (_SHIFT - 1)
    y = (269484 * r + 528482 * g + 102760 * b + (half + (16 << _SHIFT))) >> _SHIFT
    b, g, r = b[:, ::2, ::2], g[:, ::2, ::2], r[:, ::2, ::2]
    u = (-155188 * r + -305135 * g + 460324 * b + (half + (128 << _SHIFT))) >> _SHIFT
    v = (460324 * r + -385875 * g + -74448 * b + (half + (128 << _SHIFT))) >> _SHIFT
    out = torch.empty((n, h * 3 // 2, w), dtype=torch.uint8, device=frames.device)
    out[:, :h] = y.clamp_(0, 255)
    chroma = out[:, h:].view(n, 2, h // 2, w // 2)
    chroma[:, 0] = u.clamp_(0, 255)
    chroma[:, 1] = v.clamp_(0, 255)
    return out


def _time(fn, args, rounds, sync) -> float:
    fn(*args)
    sync()
    t = time.perf_counter()
    for _ in range(rounds):
        fn(*args)
    sync()
    return (time.perf_counter() - t) / rounds * 1000


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--height", type=int, default=1246)
    p.add_argument("--width", type=int, default=1084)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    n, fh, fw = args.frames, args.height, args.width
    h, w = round(fh * 936 / 1246), round(fw * 1009 / 1084)  # the idle rig's region of avatar.jpg
    src = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g).to(dev)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    mx = (xx + (torch.rand((n, h, w), generator=g) - 0.5) * 6).to(dev)
    my = (yy + (torch.rand((n, h, w), generator=g) - 0.5) * 6).to(dev)
    frames = torch.randint(0, 256, (n, fh // 2 * 2, fw // 2 * 2, 3), dtype=torch.uint8, generator=g).to(dev)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), {n} frames")
    for name, old, new, inputs in (("remap_linear", remap_round3, remap_linear, (src, mx, my)),
                                   ("i420", i420_round3, i420, (frames,))):
        same = torch.equal(old(*inputs), new(*inputs))
        before, after = _time(old, inputs, args.rounds, sync), _time(new, inputs, args.rounds, sync)
        size = f"{inputs[0].shape[2]}x{inputs[0].shape[1]}"
        print(f"{name:<13} {size:>10}: round 3 {before:8.2f} ms -> {after:8.2f} ms ({before / after:.2f}x), "
              f"same bits: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
