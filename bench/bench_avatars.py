"""What the avatar library costs: registering a photo or a video, and making a video with it by id.

    .venv/bin/python bench/bench_avatars.py [--runs 3] [--seconds 10]

For each fixture photo: the time ``LipsyncService.add_avatar`` takes (decode, exactly-one-face
check, face mesh, the engine's preparation, idle rig, storing), the size stored on disk, the
time to load the preparation again after a restart (a new service on the same folder), and a
whole request of ``--seconds`` of speech on it by ``avatar_id`` against the same request on the
preloaded avatar (medians of ``--runs``).

Video avatars: ``kennedy_low.mp4`` as it is (640x480, 29.97 fps) and looped to 10 s at
960x720 (made with ffmpeg): registering (and its ratio to the clip's duration, the issue's
limit is 1.0), the size stored, and a request of ``--seconds`` of speech on it against the
same request on its reference frame registered as a photo (same size; the issue's limit is 1.5x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lipsync.media.audio import load_audio, write_wav  # noqa: E402
from lipsync.media.ffmpeg import ffmpeg_exe  # noqa: E402
from lipsync.service import LipsyncService  # noqa: E402
from lipsync.settings import Settings  # noqa: E402

FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))


def _speech(seconds: float, folder: Path) -> bytes:
    import numpy as np

    wav = load_audio(str(FIXTURES / "kennedy_speech_16k.wav"))[int(1.5 * 16000):]
    samples = np.tile(wav, int(np.ceil(seconds * 16000 / wav.size)))[: int(seconds * 16000)]
    path = folder / "speech.wav"
    write_wav(str(path), samples)
    return path.read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(engine="builtin", face_detector="haar", output_dir=str(root / "out"),
                            cache_dir=str(root / "cache"), checkpoint_dir=str(root / "none"),
                            checkpoint_path=str(root / "none" / "x.pt"), s3fd_path=str(root / "none" / "s3fd.pth"),
                            avatar_path=str(FIXTURES / "avatar.jpg"))
        service = LipsyncService(settings).load()
        speech = _speech(args.seconds, root)
        print(f"{'photo':<16} {'register':>9} {'stored':>8} {'reload':>8} {'by id':>8} {'preloaded':>10}")
        for name in ("avatar.jpg", "kennedy_low.jpg", "mona_low.jpg"):
            data = (FIXTURES / name).read_bytes()
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                record = service.add_avatar(data, name)
                times.append(time.perf_counter() - t)
            folder = Path(settings.resolved_avatars_dir) / record.id
            stored = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            again = LipsyncService(settings).load()
            t = time.perf_counter()
            again.avatars.prepared(record.id, None)
            reload_s = time.perf_counter() - t

            def request(**kwargs) -> float:
                t0 = time.perf_counter()
                service.generate(str(root / "out.mp4"), recording=speech, **kwargs)
                return time.perf_counter() - t0

            by_id = statistics.median(request(avatar_id=record.id) for _ in range(args.runs))
            preloaded = statistics.median(request() for _ in range(args.runs)) if name == "avatar.jpg" else None
            print(f"{name:<16} {statistics.median(times) * 1000:7.0f} ms {stored:6.1f} MB {reload_s * 1000:5.0f} ms"
                  f" {by_id:6.2f} s" + (f" {preloaded:8.2f} s" if preloaded is not None else ""))
        _videos(service, root, speech, args.runs)


def _videos(service: LipsyncService, root: Path, speech: bytes, runs: int) -> None:
    clip = root / "k720_10s.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-stream_loop", "1", "-i", str(FIXTURES / "kennedy_low.mp4"),
                    "-t", "10", "-vf", "scale=960:720", "-c:v", "libx264", "-crf", "18", "-an", str(clip)], check=True)
    print(f"\n{'video':<22} {'register':>9} {'/ duration':>10} {'stored':>8} {'on video':>9} {'on photo':>9}"
          f" {'ratio':>6}")
    for label, path in (("kennedy_low.mp4 480p", FIXTURES / "kennedy_low.mp4"), ("kennedy 10 s 720p", clip)):
        data = path.read_bytes()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            record = service.add_avatar(data, label)
            times.append(time.perf_counter() - t)
        folder = Path(service.settings.resolved_avatars_dir) / record.id
        stored = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        photo = service.add_avatar(service.avatars.image(record.id, None), label + " frame")

        def request(avatar_id: str) -> float:
            t0 = time.perf_counter()
            service.generate(str(root / "out.mp4"), recording=speech, avatar_id=avatar_id)
            return time.perf_counter() - t0

        on_video = statistics.median(request(record.id) for _ in range(runs))
        on_photo = statistics.median(request(photo.id) for _ in range(runs))
        register = statistics.median(times)
        print(f"{label:<22} {register:7.2f} s {register / record.duration:10.2f} {stored:6.1f} MB"
              f" {on_video:7.2f} s {on_photo:7.2f} s {on_video / on_photo:6.2f}")


if __name__ == "__main__":
    main()
