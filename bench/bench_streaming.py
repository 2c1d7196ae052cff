"""Streaming benchmark: time to the first playable frame vs time to the whole video.

    .venv/bin/python bench/bench_streaming.py [--sentences 20] [--language en] [--engine builtin]

Renders a long text with a live fragmented MP4 (what GET /api/jobs/<id>/stream
serves) and reports when the live file first held a playable fragment (the
header plus one complete moof+mdat: a player can show frames) against when the
finished MP4 was ready.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.service import LipsyncService  # noqa: E402
from lipsync.settings import Settings  # noqa: E402

TEXTS = {
    "en": "This is sentence number {i} of a long announcement, spoken while the next one is prepared.",
    "ru": "Это предложение номер {i} длинного объявления, и пока оно звучит, готовится следующее.",
    "kk": "Бұл ұзақ хабарландырудың {i}-сөйлемі, ол айтылып жатқанда келесісі дайындалады.",
}


def playable(path: str) -> bool:
    """True once the fragmented MP4 at ``path`` holds its header and one whole fragment."""
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        return False
    seen, i = set(), 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        if size < 8 or i + size > len(data):
            break
        seen.add(kind)
        i += size
        if {b"moov", b"moof", b"mdat"} <= seen:
            return True
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=20)
    p.add_argument("--language", default="en", choices=sorted(TEXTS))
    p.add_argument("--engine", default="builtin")
    p.add_argument("--avatar", help="avatar image (default: the built-in portrait)")
    args = p.parse_args()
    text = " ".join(TEXTS[args.language].format(i=i + 1) for i in range(args.sentences))
    with tempfile.TemporaryDirectory() as tmp:
        service = LipsyncService(Settings.from_env(output_dir=tmp, cache_dir=os.path.join(tmp, "cache"),
                                                   engine=args.engine, avatar_path=args.avatar)).load()
        if service.status != "ready":
            print(f"service failed to load: {service.error}", file=sys.stderr)
            return 1
        live, out = os.path.join(tmp, "live.mp4"), os.path.join(tmp, "out.mp4")
        first: list[float] = []
        done = threading.Event()

        def watch(start: float) -> None:
            while not done.is_set():
                if playable(live):
                    first.append(time.perf_counter() - start)
                    return
                time.sleep(0.005)

        start = time.perf_counter()
        watcher = threading.Thread(target=watch, args=(start,))
        watcher.start()
        result = service.generate(out, text=text, language=args.language, live_path=live)
        total = time.perf_counter() - start
        done.set()
        watcher.join()
    info = service.describe()
    print(f"engine {info['engine']} on {info['device']}, {args.sentences} sentences ({args.language}), "
          f"{result.duration:.1f} s of video, {result.frames} frames")
    if first:
        print(f"time to first playable frame: {first[0]:.2f} s")
    print(f"time to the whole video:      {total:.2f} s")
    if first:
        print(f"playback can start {total / first[0]:.1f}x sooner than waiting for the file")
    print(f"real-time factor: {total / result.duration:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
