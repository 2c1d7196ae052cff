"""Whole-request benchmark: 10 s of speech to a finished MP4, stage by stage.

    .venv/bin/python bench/bench_pipeline.py [--engine builtin|wav2lip] [--checkpoint PATH]
                                             [--avatar IMG] [--audio WAV] [--seconds 10] [--runs 3]

Prints per-stage times (median of the runs), the real-time factor
(processing time / speech duration; < 1 is faster than real time) and the
frames per second of the whole request. Audio is given (TTS excluded) unless
--text is passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync import audio  # noqa: E402
from lipsync.service import LipsyncService  # noqa: E402
from lipsync.settings import Settings  # noqa: E402

FIXTURES = os.environ.get("LIPSYNC_FIXTURES", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))


def speech_recording(path: str | None, seconds: float) -> bytes:
    """``seconds`` of real speech as WAV bytes (the fixture looped, its leading silence skipped)."""
    path = path or os.path.join(FIXTURES, "kennedy_speech_16k.wav")
    wav = audio.load_audio(path)
    if path.endswith("kennedy_speech_16k.wav"):
        wav = wav[int(1.5 * audio.SAMPLE_RATE):]
    n = int(seconds * audio.SAMPLE_RATE)
    wav = np.tile(wav, int(np.ceil(n / len(wav))))[:n]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "speech.wav")
        audio.write_wav(out, wav)
        return open(out, "rb").read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="auto", choices=("auto", "builtin", "wav2lip"))
    p.add_argument("--checkpoint")
    p.add_argument("--avatar", help="avatar image (default: ../shared/fixtures/avatar.jpg)")
    p.add_argument("--audio", help="speech to lip-sync (default: the Kennedy fixture, looped)")
    p.add_argument("--text", help="synthesise this text instead of using --audio")
    p.add_argument("--language", default="ru")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-height", type=int, default=720)
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()

    avatar = args.avatar or os.path.join(FIXTURES, "avatar.jpg")
    overrides = dict(engine=args.engine, avatar_path=avatar if os.path.exists(avatar) else None,
                     max_output_height=args.max_height)
    if args.checkpoint:
        overrides["checkpoint_path"] = args.checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(output_dir=os.path.join(tmp, "out"), cache_dir=os.path.join(tmp, "cache"),
                                     **overrides)
        t = time.perf_counter()
        service = LipsyncService(settings).load()
        load_s = time.perf_counter() - t
        if service.status != "ready":
            print(f"service failed to load: {service.error}", file=sys.stderr)
            return 1
        recording = None if args.text else speech_recording(args.audio, args.seconds)
        runs = []
        for i in range(args.runs + 1):  # the first run warms caches and is not counted
            out = os.path.join(tmp, f"run{i}.mp4")
            result = service.generate(out, text=args.text, language=args.language, recording=recording)
            if i:
                runs.append(result)
        info = service.describe()

    stages = sorted({k for r in runs for k in r.timings})
    median = {k: statistics.median(r.timings.get(k, 0.0) for r in runs) for k in stages}
    duration = runs[0].duration
    frames = runs[0].frames
    total_s = median["total"] / 1000.0
    h, w = info["avatar"]["height"], info["avatar"]["width"]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"engine: {info['engine']} on {info['device']}, avatar {w}x{h}, {duration:.2f} s speech, "
          f"{frames} frames, load {load_s:.2f} s, median of {len(runs)} runs")
    for k in stages:
        print(f"  {k:<10} {median[k]:9.1f} ms")
    print(f"real-time factor: {total_s / duration:.3f}  ({duration / total_s:.1f}x real time)")
    print(f"frames per second (whole request): {frames / total_s:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": info["engine"], "device": info["device"], "width": w, "height": h,
                       "speech_s": duration, "frames": frames, "stages_ms": median,
                       "rtf": total_s / duration, "fps": frames / total_s}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
