"""Frames and encoding without a model: the CPU path vs ``GpuFrames``, and every encoder layout.

    python bench/bench_frames.py [--height 1246] [--seconds 40.7] [--layouts 1x0,8x2,16x1]
                                 [--presets veryfast] [--device auto] [--runs 3]

Makes --seconds of 25 fps frames of the fixture avatar (mouth patches moving, idle motion on):
first on the CPU (``video.composite`` + ``apply_idle`` + BGR->I420 per frame), then with
``lipsync.media.gpu_frames.GpuFrames`` on --device, and checks they are the same bytes. Then
encodes those I420 frames (plus silence) with each encoder (--encoders: x264 at each of
--presets, openh264) and layout WxT: W encoder processes on segments (``SegmentedMp4Writer``) of
T threads each, ``1x0`` being one stream (``Mp4Writer``, ffmpeg's thread choice). Prints the
wall time, frames/s and MB of each (median of --runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lipsync.engines.base import PreparedAvatar, Region  # noqa: E402
from lipsync.engines.wav2lip.engine import paste_mask  # noqa: E402
from lipsync.faces.box import FaceBox  # noqa: E402
from lipsync.faces.landmarks import face_landmarks  # noqa: E402
from lipsync.media import video  # noqa: E402
from lipsync.media.gpu_frames import GpuFrames  # noqa: E402
from lipsync.media.segments import SegmentedMp4Writer  # noqa: E402
from lipsync.motion.idle import apply_idle, idle_track, prepare_idle  # noqa: E402

FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))
FPS = 25


def scene(height: int, frames: int):
    image = video.fit_to_height(cv2.imread(str(FIXTURES / "avatar.jpg")), height)
    box = FaceBox(420, 137, 885, 602).scaled(height / 1483).clip(image.shape[1], image.shape[0])
    region = Region(box.x1, box.y1, box.x2, box.y2 + 10).clip(image.shape[1], image.shape[0])
    landmarks = face_landmarks(image, box)
    avatar = PreparedAvatar(image=image, box=box, region=region, mask=paste_mask(image, box, region, landmarks))
    rig = prepare_idle(image, box, landmarks)
    track = idle_track(frames, FPS, seed=1, face_height=rig.face_height,
                       mouth_open=np.abs(np.sin(np.arange(frames) / 2.5)))
    crop = image[region.y1:region.y2, region.x1:region.x2]
    patches = np.stack([np.roll(crop, int(6 * np.sin(i / 2.5)), axis=0) for i in range(frames)])
    return avatar, rig, track, patches


def cpu_frames(avatar, rig, track, patches) -> tuple[list[np.ndarray], float]:
    t = time.perf_counter()
    moved = np.empty_like(avatar.image)
    out = [cv2.cvtColor(apply_idle(f, rig, track, k, out=moved), cv2.COLOR_BGR2YUV_I420)
           for k, f in enumerate(video.composite(avatar, [patches]))]
    return out, time.perf_counter() - t


def gpu_frames(avatar, rig, track, patches, device, batch: int = 64) -> tuple[list[np.ndarray], float]:
    frames = GpuFrames(avatar, device, rig)
    on_device = torch.from_numpy(patches).to(device)  # as the Wav2Lip engine leaves them
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = []
    for start in range(0, len(patches), batch):
        out.extend(frames.frames(on_device[start:start + batch], start, track))
    return out, time.perf_counter() - t


def encode(frames: list[np.ndarray], width: int, height: int, path: str, workers: int, threads: int,
           preset: str, encoder: str = "x264") -> float:
    t = time.perf_counter()
    if workers <= 1:
        writer = video.Mp4Writer(path, width, height, FPS, preset=preset, threads=threads, encoder=encoder)
    else:
        writer = SegmentedMp4Writer(path, width, height, FPS, preset=preset, workers=workers, threads=threads,
                                    encoder=encoder)
    with writer:
        writer.write_audio(np.zeros(len(frames) * 640, np.float32))
        for frame in frames:
            writer.write_i420(frame)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--layouts", default="1x0,8x2", help="WxT: W segment encoders of T x264 threads; 1x0: one stream")
    p.add_argument("--presets", default="veryfast", help="x264 presets (openh264 has none)")
    p.add_argument("--encoders", default="x264", help="H.264 encoders: x264, openh264 (comma-separated)")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    n = int(round(args.seconds * FPS))
    avatar, rig, track, patches = scene(args.height, n)
    h, w = avatar.image.shape[:2]
    print(f"{n} frames {w}x{h}, {os.cpu_count()} cpus, frames on {device}"
          f"{' (' + torch.cuda.get_device_name(0) + ')' if device.type == 'cuda' else ''}")
    want, cpu_s = cpu_frames(avatar, rig, track, patches)
    gpu_frames(avatar, rig, track, patches[:64], device)  # warm-up
    got, gpu_s = gpu_frames(avatar, rig, track, patches, device)
    differing = sum(int(np.count_nonzero(a != b)) for a, b in zip(got, want))
    worst = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(got, want))
    print(f"frames (composite + idle motion + I420): CPU {cpu_s * 1000:.0f} ms ({n / cpu_s:.0f} fps), "
          f"GpuFrames {gpu_s * 1000:.0f} ms ({n / gpu_s:.0f} fps); bytes differing {differing}, max diff {worst}")
    print("  layout    encoder   preset       wall ms    fps      MB")
    configs = [(e, p_) for e in args.encoders.split(",") for p_ in (args.presets.split(",") if e == "x264" else ["-"])]
    with tempfile.TemporaryDirectory() as tmp:
        for encoder, preset in configs:
            for layout in args.layouts.split(","):
                workers, threads = (int(v) for v in layout.split("x"))
                path = os.path.join(tmp, f"{layout}-{encoder}-{preset}.mp4")
                walls = [encode(got, w, h, path, workers, threads, preset, encoder) for _ in range(args.runs)]
                wall = statistics.median(walls)
                print(f"  {layout:<8}  {encoder:<8}  {preset:<10}  {wall * 1000:8.0f}  {n / wall:6.0f}  "
                      f"{os.path.getsize(path) / 1e6:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
