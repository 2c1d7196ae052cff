"""How fast frames become an MP4: composite + Mp4Writer alone, no model.

    .venv/bin/python bench/bench_encode.py [--seconds 10] [--height 720] [--presets veryfast,superfast]
                                           [--threads 0] [--parallel 1,4]

Composites --seconds of 25 fps frames (the fixture avatar scaled to
--height, a moving patch over the mouth region) and encodes them with
``lipsync.media.video.Mp4Writer`` (yuv420p converted in Python, x264 with the
given preset and threads, AAC speech). ``--parallel N`` runs N such encodes
at once (concurrent requests). Prints frames per second of the whole
composite+encode and the seconds of video made per second of wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from lipsync.engines.base import PreparedAvatar, Region  # noqa: E402
from lipsync.engines.wav2lip.engine import feather_mask  # noqa: E402
from lipsync.faces.box import FaceBox  # noqa: E402
from lipsync.media import video  # noqa: E402

FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))


def avatar(height: int) -> PreparedAvatar:
    image = cv2.imread(str(FIXTURES / "avatar.jpg"))
    if image is None:
        rng = np.random.default_rng(0)
        image = cv2.GaussianBlur(rng.integers(0, 256, (1483, 1290, 3), dtype=np.uint8), (0, 0), 5)
    scale = height / image.shape[0]
    image = video.fit_to_height(image, height)
    box = FaceBox(420, 137, 885, 612).scaled(scale).clip(image.shape[1], image.shape[0])
    region = Region(box.x1, box.y1, box.x2, box.y2)
    return PreparedAvatar(image=image, box=box, region=region, mask=feather_mask(region.height, region.width))


def patches(av: PreparedAvatar, frames: int) -> np.ndarray:
    r = av.region
    crop = av.image[r.y1:r.y2, r.x1:r.x2]
    out = np.empty((frames, r.height, r.width, 3), np.uint8)
    for i in range(frames):
        shift = int(6 * np.sin(i / 2.5))
        out[i] = np.roll(crop, shift, axis=0)
    return out


def encode(av: PreparedAvatar, batch: np.ndarray, path: str, preset: str, threads: int, tune: str | None) -> float:
    h, w = av.image.shape[:2]
    t = time.perf_counter()
    with video.Mp4Writer(path, w, h, 25, preset=preset, threads=threads, tune=tune) as writer:
        writer.write_audio(np.zeros(len(batch) * 640, np.float32))
        for frame in video.composite(av, [batch]):
            writer.write(frame)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--presets", default="veryfast,superfast,ultrafast")
    p.add_argument("--threads", default="0", help="x264 threads, comma-separated (0 = ffmpeg's choice)")
    p.add_argument("--parallel", default="1,4", help="encodes at once, comma-separated")
    p.add_argument("--tunes", default="none", help="x264 tunes, comma-separated (none = no -tune)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    av = avatar(args.height)
    frames = int(args.seconds * 25)
    batch = patches(av, frames)
    h, w = av.image.shape[:2]
    print(f"composite + encode {frames} frames {w}x{h} ({args.seconds:.0f} s), {os.cpu_count()} cpus, "
          f"median of {args.runs}")
    print("  preset      tune         threads  parallel   wall ms   fps (all)   x real time")
    with tempfile.TemporaryDirectory() as tmp:
        for preset, tune in ((p_, t_) for p_ in args.presets.split(",") for t_ in args.tunes.split(",")):
            tune = None if tune == "none" else tune
            for threads in (int(t) for t in args.threads.split(",")):
                for parallel in (int(n) for n in args.parallel.split(",")):
                    walls = []
                    for run in range(args.runs + 1):
                        jobs = [threading.Thread(target=encode, args=(av, batch, os.path.join(tmp, f"{run}-{i}.mp4"),
                                                                       preset, threads, tune))
                                for i in range(parallel)]
                        t = time.perf_counter()
                        for j in jobs:
                            j.start()
                        for j in jobs:
                            j.join()
                        if run:
                            walls.append(time.perf_counter() - t)
                    wall = statistics.median(walls)
                    print(
                        f"  {preset:<11} {tune or '-':<12} {threads:>7}  {parallel:>8}  {wall * 1000:8.0f}  "
                        f"{parallel * frames / wall:10.0f}"
                        f"  {parallel * args.seconds / wall:12.1f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
