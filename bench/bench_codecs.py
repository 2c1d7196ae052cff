"""The H.264 encoders side by side: CPU time, size and quality of the same avatar frames.

    python bench/bench_codecs.py [--height 720] [--seconds 10] [--configs x264:veryfast:23,openh264::23]
                                 [--threads 1]

Makes --seconds of 25 fps frames as a request does (the fixture avatar, mouth patches moving,
idle motion on: ``bench_frames.scene``), writes them once as raw I420, then encodes them with
each configuration ENCODER:PRESET:CRF (``lipsync.media.video.h264_options``; openh264 takes no
preset and uses CRF as its fixed quantiser) by one ffmpeg of --threads encoder threads. Prints the
encoder's CPU seconds (user + system of the ffmpeg process: what a core spends, so the ratio
between rows holds on any machine), wall seconds, CPU milliseconds per frame, the file's size,
and its SSIM and PSNR against the frames (ffmpeg's ``ssim``/``psnr`` filters, luma and chroma).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_frames import FPS, cpu_frames, scene  # noqa: E402

from lipsync.media.ffmpeg import ffmpeg_exe  # noqa: E402
from lipsync.media.video import h264_options  # noqa: E402


def encode(raw: str, size: str, out: str, encoder: str, preset: str, crf: int, threads: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one ffmpeg encoding ``raw`` to ``out``."""
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
           "-pix_fmt", "yuv420p", "-s", size, "-r", str(FPS), "-i", raw,
           *h264_options(encoder, preset, crf, threads, 2 * FPS), "-an", out]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"ffmpeg failed: {proc.stderr.read().decode(errors='replace')}")
    return usage.ru_utime + usage.ru_stime, wall


def quality(raw: str, size: str, out: str) -> tuple[float, float]:
    """(SSIM, PSNR in dB) of ``out`` against the raw frames, all planes."""
    text = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", out, "-f", "rawvideo", "-pix_fmt",
                           "yuv420p", "-s", size, "-r", str(FPS), "-i", raw, "-lavfi",
                           "[0:v][1:v]ssim;[0:v][1:v]psnr", "-f", "null", "-"],
                          capture_output=True, text=True).stderr
    ssim = float(re.search(r"SSIM .*All:([0-9.]+)", text).group(1))
    psnr = float(re.search(r"PSNR .*average:([0-9.inf]+)", text).group(1))
    return ssim, psnr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--configs", default="x264:veryfast:23,x264:superfast:23,x264:ultrafast:23,"
                                        "x264:ultrafast:30,openh264::23,openh264::25")
    p.add_argument("--threads", type=int, default=1, help="encoder threads of each ffmpeg (default 1: CPU per frame)")
    args = p.parse_args()
    n = int(round(args.seconds * FPS))
    avatar, rig, track, patches = scene(args.height, n)
    frames, _ = cpu_frames(avatar, rig, track, patches)
    h, w = avatar.image.shape[:2]
    size = f"{w}x{h}"
    print(f"{n} frames {size} (avatar.jpg, idle motion, moving mouth), {os.cpu_count()} cpus, "
          f"{args.threads} encoder thread(s)")
    print("  encoder   preset      crf/qp   cpu s   wall s   cpu ms/frame     KB    SSIM     PSNR")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "frames.yuv")
        with open(raw, "wb") as f:
            for frame in frames:
                f.write(frame.tobytes())
        del frames
        for config in args.configs.split(","):
            encoder, preset, crf = config.split(":")
            out = os.path.join(tmp, "out.mp4")
            cpu, wall = encode(raw, size, out, encoder, preset or "veryfast", int(crf), args.threads)
            ssim, psnr = quality(raw, size, out)
            print(f"  {encoder:<9} {preset or '-':<11} {crf:>6}  {cpu:6.2f}  {wall:7.2f}  {cpu / n * 1000:13.2f}  "
                  f"{os.path.getsize(out) / 1000:6.0f}  {ssim:.4f}  {psnr:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
