"""How visibly each avatar speaks each input: per avatar and language, from whole MP4s.

    .venv/bin/python bench/bench_articulation.py [--avatars A.jpg B.png ...] [--sheets DIR]
                                                 [--judge PYTHON] [--engine builtin]

For the fixture photos, the built-in portrait and any ``--avatars``, the service makes an
MP4 of the Russian, Kazakh and English sentences the issue names and of the Kennedy
recording, then prints per video:

* ``pixels r / opening``: (from a second MP4 without idle motion) the dark mouth opening
  measured in the decoded frames against the avatar (its height at the mouth's centre
  over the mouth's width; loud-frame 90th percentile minus the quiet frames), correlated
  with the MP4's own loudness: the measure ``tests/test_articulation.py`` asserts (r >= 0.65, opening >= 0.08);
* ``judge r / opening``: ``../shared/tools/lip_judge.py`` (MediaPipe's face mesh with
  refined lips, in its own environment; the issue's targets r >= 0.5, opening >= 0.10),
  when ``--judge`` (default ``../.judge/bin/python``) exists. The judge is a tool of the
  shared workspace, never a dependency of the project.

``--sheets DIR`` also writes one contact sheet per video: the mouth in 32 consecutive
frames from the first sound, with the frame's loudness.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from lipsync.faces.landmarks import face_landmarks  # noqa: E402
from lipsync.faces.locator import FaceLocator  # noqa: E402
from lipsync.media.audio import frame_loudness  # noqa: E402
from lipsync.service import LipsyncService, default_avatar  # noqa: E402
from lipsync.settings import Settings  # noqa: E402
from tests.media import decoded_audio, decoded_frames, mouth_figures  # noqa: E402

FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))
JUDGE = REPO.parent / "shared" / "tools" / "lip_judge.py"
TEXTS = {
    "ru": "Мама мыла раму. Папа пошёл на работу, а бабушка испекла пироги.",
    "kk": "Сәлеметсіз бе! Мен сіздің виртуалды көмекшіңізбін. Бүгін ауа райы өте жақсы.",
    "en": "Hello! I am your virtual assistant. Would you like to hear about our opening hours?",
}


def judge(python: Path, video: Path) -> tuple[float, float] | None:
    """(r, opening) from the external judge, or None when it is not installed."""
    if not python.exists() or not JUDGE.exists():
        return None
    out = subprocess.run([str(python), str(JUDGE), str(video)], capture_output=True, text=True).stdout
    m = re.search(r"r=(-?[\d.]+).*opening p90-rest=(-?[\d.]+)", out)
    return (float(m.group(1)), float(m.group(2))) if m else None


def contact_sheet(video: Path, avatar: np.ndarray, path: Path, title: str) -> None:
    frames = list(decoded_frames(video))
    pcm = decoded_audio(video)
    loud = frame_loudness(pcm, len(frames), 25)
    h, w = frames[0].shape[:2]
    ref = cv2.resize(avatar, (w, h), interpolation=cv2.INTER_AREA)
    lm = face_landmarks(ref, FaceLocator(detector="haar").locate(ref))
    left, right = lm.points[61], lm.points[291]
    width = float(np.linalg.norm(right - left))
    cx, cy = 0.5 * (left + right)
    x1, x2 = int(max(0, cx - 1.0 * width)), int(min(w, cx + 1.0 * width))
    y1, y2 = int(max(0, cy - 0.7 * width)), int(min(h, cy + 0.9 * width))
    start = int(np.argmax(loud > 0.1))
    tiles = []
    for i in range(start, min(len(frames), start + 32)):
        tile = cv2.resize(frames[i][y1:y2, x1:x2], (200, int(200 * (y2 - y1) / (x2 - x1))),
                          interpolation=cv2.INTER_AREA)
        label = f"{i} {i / 25:.2f}s loud {loud[i]:.2f}"
        cv2.putText(tile, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 3)
        cv2.putText(tile, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (80, 255, 80), 1)
        tiles.append(tile)
    while len(tiles) % 8:
        tiles.append(np.zeros_like(tiles[0]))
    sheet = np.concatenate([np.concatenate(tiles[i:i + 8], 1) for i in range(0, len(tiles), 8)], 0)
    cv2.putText(sheet, title, (4, sheet.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 255), 1)
    cv2.imwrite(str(path), sheet, [cv2.IMWRITE_JPEG_QUALITY, 85])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avatars", nargs="*", type=Path, default=[], help="more avatar images")
    ap.add_argument("--sheets", type=Path, default=None, help="write contact sheets (JPEG) here")
    ap.add_argument("--judge", type=Path, default=REPO.parent / ".judge" / "bin" / "python",
                    help="python of the judge's own environment")
    ap.add_argument("--engine", default="builtin", choices=["builtin", "wav2lip"])
    ap.add_argument("--checkpoint", default=None, help="Wav2Lip checkpoint (with --engine wav2lip)")
    args = ap.parse_args()

    avatars = {"builtin": default_avatar()}
    for name in ("avatar.jpg", "kennedy_low.jpg", "mona_low.jpg"):
        if (FIXTURES / name).exists():
            avatars[Path(name).stem] = cv2.imread(str(FIXTURES / name))
    for path in args.avatars:
        avatars[path.stem] = cv2.imread(str(path))
    wav = FIXTURES / "kennedy_speech_16k.wav"
    recording = wav.read_bytes() if wav.exists() else None

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(engine=args.engine, face_detector="haar", output_dir=str(root / "out"),
                            cache_dir=str(root / "cache"), checkpoint_dir=str(root / "none"),
                            checkpoint_path=args.checkpoint or str(root / "none" / "x.pt"),
                            s3fd_path=str(root / "none" / "s3fd.pth"))
        service = LipsyncService(settings).load()
        if args.sheets:
            args.sheets.mkdir(parents=True, exist_ok=True)
        print(f"engine {service.describe()['engine']}; judge: "
              f"{args.judge if args.judge.exists() and JUDGE.exists() else 'not installed (figures nan)'}")
        print(f"{'avatar':<16} {'input':<9} {'pixels r':>8} {'opening':>8} {'judge r':>8} {'opening':>8}")
        short = 0
        for name, image in avatars.items():
            ok, png = cv2.imencode(".png", image)
            for source in ("ru", "kk", "en", "recording"):
                video = root / f"{name}_{source}.mp4"
                if source == "recording" and recording is None:
                    continue
                inputs = ({"recording": recording} if source == "recording"
                          else {"text": TEXTS[source], "language": source})
                # The judge sees the product as served (idle motion on); the pixel measure
                # compares frames with the still photo, so it gets a still head.
                still = root / f"{name}_{source}_still.mp4"
                service.generate(str(video), avatar_image=png.tobytes(), **inputs)
                service.generate(str(still), avatar_image=png.tobytes(), idle_motion=False, **inputs)
                r, opening = mouth_figures(still, image)
                judged = judge(args.judge, video)
                jr, jo = judged if judged else (float("nan"), float("nan"))
                miss = judged is not None and (jr < 0.5 or jo < 0.10)
                short += miss
                print(f"{name:<16} {source:<9} {r:8.2f} {opening:8.3f} {jr:8.2f} {jo:8.3f}"
                      + ("  << short" if miss else ""))
                if args.sheets:
                    contact_sheet(video, image, args.sheets / f"{name}_{source}.jpg", f"{name} {source}")
        print(f"{short} video(s) below the judge's targets")


if __name__ == "__main__":
    main()
