"""Command line: the same pipeline as the web service.

    python -m lipsync generate --text "Привет" --language ru --out hello.mp4
    python -m lipsync generate --audio speech.wav --avatar me.jpg --out me.mp4
    python -m lipsync avatars add me.jpg --name "Me"      (then: generate --avatar-id av_...; or me.mp4)
    python -m lipsync avatars list | delete ID
    python -m lipsync health
    python -m lipsync models                              (then: generate --model NAME)
    python -m lipsync worker          (cluster mode, QUEUE_URL=redis://...: render queued jobs)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace

from lipsync.errors import LipsyncError
from lipsync.settings import Settings, SettingsError
from lipsync.tts.base import DEFAULT_LANGUAGE, LANGUAGE_CHOICES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lipsync", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make an MP4 of the avatar speaking")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text to speak (needs --language)")
    source.add_argument("--audio", help="a recording to lip-sync instead of TTS (any format ffmpeg reads)")
    gen.add_argument("--language", choices=LANGUAGE_CHOICES, default=DEFAULT_LANGUAGE,
                     help=f"language of --text; auto: from its letters (default {DEFAULT_LANGUAGE})")
    gen.add_argument("--allow-mismatch", action="store_true",
                     help="let the voice read a text in another script (an accent on purpose)")
    who = gen.add_mutually_exclusive_group()
    who.add_argument("--avatar", help="avatar image (default: AVATAR_PATH, else the built-in portrait)")
    who.add_argument("--avatar-id", help="an avatar of the library (python -m lipsync avatars list)")
    gen.add_argument("--checkpoint", help="Wav2Lip checkpoint (default: CHECKPOINT_PATH)")
    gen.add_argument("--engine", choices=("auto", "wav2lip", "builtin"), help="lip-sync engine (default: ENGINE)")
    gen.add_argument("--model", help="a model by name: a checkpoint's file stem or builtin (python -m lipsync "
                                     "models; default: the avatar's, else DEFAULT_MODEL)")
    gen.add_argument("--no-idle-motion", action="store_true",
                     help="no blinks, head sway or breathing (default: IDLE_MOTION)")
    gen.add_argument("--out", required=True, help="output .mp4 path")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("health", help="load everything and print what the service would report")
    sub.add_parser("models", help="load every model and print each as a JSON line (as GET /api/models)")
    sub.add_parser("worker", help="cluster mode: render the jobs queued in QUEUE_URL (run one per GPU)")

    avatars = sub.add_parser("avatars", help="the avatar library (AVATARS_DIR), as the API without a key sees it")
    act = avatars.add_subparsers(dest="action", required=True)
    add = act.add_parser("add", help="add an image or a video clip: its face is found and it is prepared once")
    add.add_argument("image", help="a PNG/JPEG photo or a video (MP4, MOV, WebM, MKV, AVI)")
    add.add_argument("--name")
    add.add_argument("--model", help="the avatar's preferred model (requests on it that name none get it)")
    act.add_parser("list", help="print the entries as JSON lines")
    delete = act.add_parser("delete", help="delete an entry and its files")
    delete.add_argument("avatar_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "health":
        return _health(settings)
    if args.command == "models":
        return _models(settings)
    if args.command == "avatars":
        return _avatars(args, settings)
    if args.command == "worker":
        return _worker(settings)
    return _generate(args, settings)


def _load(settings: Settings):
    from lipsync.service import LipsyncService

    service = LipsyncService(settings).load()
    if service.status != "ready":
        print(f"error: {service.error}", file=sys.stderr)
    return service


def _health(settings: Settings) -> int:
    service = _load(settings)
    print(json.dumps(service.describe(), indent=2, ensure_ascii=False))
    return 0 if service.status == "ready" else 1


def _models(settings: Settings) -> int:
    service = _load(settings)
    if service.status != "ready":
        return 1
    for model in service.models.public():
        print(json.dumps(model, ensure_ascii=False))
    return 0


def _read_file(path: str) -> bytes | None:
    """The file's bytes, or None after saying on stderr why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return None


def _avatars(args, settings: Settings) -> int:
    service = _load(settings)
    if service.status != "ready":
        return 1
    try:
        if args.action == "add":
            data = _read_file(args.image)
            if data is None:
                return 2
            print(json.dumps(service.add_avatar(data, args.name, model=args.model).public(), ensure_ascii=False))
        elif args.action == "list":
            for record in service.avatars.list(None):
                print(json.dumps(record.public(), ensure_ascii=False))
        else:
            service.avatars.delete(args.avatar_id, None)
    except LipsyncError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    return 0


def _generate(args, settings: Settings) -> int:
    overrides = {}
    if args.avatar:
        overrides["avatar_path"] = args.avatar
    if args.checkpoint:
        overrides["checkpoint_path"] = args.checkpoint
    if args.engine:
        overrides["engine"] = args.engine
    settings = replace(settings, **overrides)
    service = _load(settings)
    if service.status != "ready":
        return 1

    recording = None
    if args.audio:
        recording = _read_file(args.audio)
        if recording is None:
            return 2

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=100, unit="%", bar_format="{desc:<8} {bar} {percentage:3.0f}% {elapsed}")

    def progress(stage: str, fraction: float) -> None:
        if bar is not None:
            bar.set_description_str(stage)
            bar.n = round(100 * fraction)
            bar.refresh()

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        result = service.generate(out, text=args.text, language=args.language, recording=recording,
                                  allow_mismatch=args.allow_mismatch, progress=progress,
                                  avatar_id=args.avatar_id, idle_motion=False if args.no_idle_motion else None,
                                  model=args.model)
    except LipsyncError as exc:
        if bar is not None:
            bar.close()
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    stages = ", ".join(f"{k} {v / 1000:.2f} s" for k, v in result.timings.items())
    print(f"{out}: {result.duration:.2f} s, {result.frames} frames, model {result.engine} ({stages})")
    return 0


def _worker(settings: Settings) -> int:
    """``python -m lipsync worker``: load the pipeline once, render cluster jobs until SIGTERM."""
    if not settings.queue_url:
        print("error: the worker needs QUEUE_URL (redis://host:port/db), the cluster's Redis", file=sys.stderr)
        return 2
    # The worker logs like the web processes (JSON lines, the "job" line per job) and links
    # webhooks to the same URLs; those helpers live with the web layer.
    from lipsync.jobs.worker import serve
    from lipsync.memory import release_memory, tune_malloc
    from lipsync.server.links import job_links
    from lipsync.server.observability import Metrics, configure_logging, record_finished_job
    from lipsync.server.settings import ServerSettings
    from lipsync.service import LipsyncService
    from lipsync.tempdirs import sweep_stale_temp

    try:
        server = ServerSettings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = logging.getLogger()
    for handler in list(root.handlers):  # main()'s plain stderr handler: the worker logs JSON lines instead
        root.removeHandler(handler)
    configure_logging(server.log_level, server.log_format)
    tune_malloc()
    service = LipsyncService(settings)
    sweep_stale_temp(service.temp_root())
    metrics = Metrics()

    def job_ended(state: dict) -> None:
        release_memory()
        record_finished_job(metrics, state)

    return serve(service, settings, on_job_end=job_ended, job_links=job_links)
