"""How late a request notices that its ffmpeg has exited: ``Popen.wait(timeout)`` vs ``wait_exit``.

    .venv/bin/python bench/bench_process_wait.py [--runs 20] [--frames 250]

Encodes ``--frames`` grey 626x720 frames with openh264 (as a request's last ffmpeg, the one it
waits for, works: its input closed, then the encoder flushes and the muxer writes), ``--runs``
times with each wait, alternately, and prints the median time from closing its input to the
wait's return. ``Popen.wait`` with a timeout sleeps between checks in steps that double up to
50 ms; ``wait_exit`` wakes on a pidfd at the exit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.media.ffmpeg import ffmpeg_exe, has_encoder, wait_exit  # noqa: E402


def one(wait, frames: int, out: str) -> float:
    codec = "libopenh264" if has_encoder("libopenh264") else "libx264"
    proc = subprocess.Popen([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
                             "-pix_fmt", "yuv420p", "-s", "626x720", "-r", "25", "-i", "pipe:0", "-c:v", codec,
                             "-f", "mp4", out], stdin=subprocess.PIPE)
    frame = bytes([128]) * (626 * 720 * 3 // 2)
    for _ in range(frames):
        proc.stdin.write(frame)
    t = time.perf_counter()
    proc.stdin.close()
    code = wait(proc)
    if code != 0:
        raise SystemExit(f"ffmpeg failed ({code})")
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--frames", type=int, default=250)
    args = p.parse_args()
    waits = {"Popen.wait(timeout=60)": lambda proc: proc.wait(timeout=60),
             "wait_exit(proc, 60)": lambda proc: wait_exit(proc, 60)}
    times: dict[str, list[float]] = {name: [] for name in waits}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.mp4")
        for _ in range(args.runs):
            for name, wait in waits.items():
                times[name].append(one(wait, args.frames, out))
    for name, values in times.items():
        print(f"{name:<24} input closed -> wait returned: median {statistics.median(values) * 1000:6.1f} ms, "
              f"best {min(values) * 1000:6.1f} ms, worst {max(values) * 1000:6.1f} ms ({args.runs} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
