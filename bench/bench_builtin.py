"""How fast the built-in lip-sync engine draws frames on one CPU core.

    .venv/bin/python bench/bench_builtin.py [--face-px 512] [--seconds 10]
                                            [--sheets DIR]

Prints the engine's frames per second for a face of ``--face-px`` pixels
(the fixture avatar scaled so its face box is that wide), uncached (every
frame drawn from scratch) and as ``render`` runs (with its per-request cache),
and the real-time factor of rendering ``--seconds`` of real speech at 25 fps
(render time / audio duration; below 1 is faster than real time).

``--sheets DIR`` also writes contact sheets (4x4 grids of the lower face at
moments of speech) for every fixture face, from the real speech and, when
espeak-ng is available, from a Russian and an English sentence.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from lipsync.engines.builtin.engine import BuiltinEngine  # noqa: E402
from lipsync.faces.box import FaceBox  # noqa: E402
from lipsync.media.audio import load_audio  # noqa: E402
from lipsync.tts.base import Speech  # noqa: E402

FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))
FACES = {
    "avatar": ("avatar.jpg", FaceBox(420, 137, 885, 602)),
    "kennedy": ("kennedy_low.jpg", FaceBox(214, 122, 478, 386)),
    "mona": ("mona_low.jpg", FaceBox(406, 168, 762, 524)),
}
FPS = 25


def _speech(seconds: float) -> Speech:
    wav = load_audio(str(FIXTURES / "kennedy_speech_16k.wav"))
    speech = wav[int(1.5 * 16000):]  # skip the leading silence
    reps = int(np.ceil(seconds * 16000 / speech.size))
    return Speech(np.tile(speech, reps)[: int(seconds * 16000)])


def _scaled_avatar(face_px: int):
    name, box = FACES["avatar"]
    image = cv2.imread(str(FIXTURES / name), cv2.IMREAD_COLOR)
    s = face_px / box.width
    image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    return image, box.scaled(s)


def bench(face_px: int, seconds: float) -> None:
    cv2.setNumThreads(1)
    engine = BuiltinEngine()
    image, box = _scaled_avatar(face_px)
    t0 = time.perf_counter()
    avatar = engine.prepare(image, box)
    t_prep = time.perf_counter() - t0
    speech = _speech(seconds)
    track = engine.track(speech, FPS)
    renderer = avatar.state
    # Uncached: every frame drawn from its exact (unquantised) state.
    n = min(len(track), 250)
    renderer.render(0.5, 0.2)  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        renderer.render(float(track.open[i]) or 0.3, float(track.wide[i]))
    uncached = n / (time.perf_counter() - t0)
    # As served: the whole clip through Engine.render (drive + cache + batches).
    t0 = time.perf_counter()
    frames = sum(b.shape[0] for b in engine.render(avatar, speech, FPS))
    t_render = time.perf_counter() - t0
    r = avatar.region
    print(f"face {box.width}x{box.height} px, region {r.width}x{r.height} px, one thread")
    print(f"prepare: {t_prep * 1000:.0f} ms")
    print(f"frames per second, uncached draw: {uncached:.0f}")
    print(f"frames per second, Engine.render: {frames / t_render:.0f} ({frames} frames incl. audio analysis)")
    print(f"real-time factor for {seconds:g} s of speech: {t_render / seconds:.3f} "
          f"({t_render:.2f} s to render {seconds:g} s)")


# ---------------------------------------------------------------- contact sheets


def _composite(avatar, patch):
    r = avatar.region
    out = avatar.image.copy()
    base = out[r.y1:r.y2, r.x1:r.x2].astype(np.float32)
    m = avatar.mask
    out[r.y1:r.y2, r.x1:r.x2] = np.clip(m * patch + (1 - m) * base + 0.5, 0, 255).astype(np.uint8)
    return out


def _sheet(engine, avatar, speech, start_s: float, path: Path, title: str) -> None:
    frames = np.concatenate(list(engine.render(avatar, speech, FPS)))
    track = engine.track(speech, FPS)
    r, box = avatar.region, avatar.box
    tiles = []
    first = int(start_s * FPS)
    for k in range(16):
        i = min(len(frames) - 1, first + k)
        comp = _composite(avatar, frames[i])
        y0 = max(0, r.y1 - int(0.06 * box.height))
        tile = comp[y0:r.y2, r.x1:r.x2]
        tile = cv2.resize(tile, (320, int(320 * tile.shape[0] / tile.shape[1])), interpolation=cv2.INTER_AREA)
        label = f"{i / FPS:.2f}s o={track.open[i]:.2f} w={track.wide[i]:+.2f}"
        ph = [e.phoneme for e in speech.phonemes if e.start <= (i + 0.5) / FPS < e.end]
        if ph:
            label += f" [{ph[0]}]"
        cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 3)
        cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (80, 255, 80), 1)
        tiles.append(tile)
    sheet = np.concatenate([np.concatenate(tiles[i:i + 4], 1) for i in range(0, 16, 4)], 0)
    cv2.putText(sheet, title, (4, sheet.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 255), 1)
    cv2.imwrite(str(path), sheet)
    print("wrote", path)


def sheets(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = BuiltinEngine()
    real = Speech(load_audio(str(FIXTURES / "kennedy_speech_16k.wav")))
    clips = [("speech", real, (1.4, 2.3, 3.8))]
    try:
        from lipsync.tts.espeak import EspeakTTS
        tts = EspeakTTS()
        clips.append(("ru", tts.synthesize("Мама мыла раму, а папа пил воду.", "ru"), (0.0, 0.64, 1.28)))
        clips.append(("en", tts.synthesize("Bob made a map, and Pam bought a big lamp.", "en"), (0.0, 0.64, 1.6)))
    except Exception as exc:  # noqa: BLE001 - sheets without espeak are still useful
        print("espeak unavailable:", exc)
    for key, (name, box) in FACES.items():
        image = cv2.imread(str(FIXTURES / name), cv2.IMREAD_COLOR)
        avatar = engine.prepare(image, box)
        for clip, speech, starts in clips:
            for s in starts:
                _sheet(engine, avatar, speech, s, out_dir / f"{key}_{clip}_{s:.2f}.png",
                       f"{key} {clip} from {s:.2f}s ({'phonemes' if speech.phonemes else 'audio'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--face-px", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sheets", type=Path, default=None, help="also write contact sheets here")
    args = ap.parse_args()
    bench(args.face_px, args.seconds)
    if args.sheets:
        sheets(args.sheets)


if __name__ == "__main__":
    main()
