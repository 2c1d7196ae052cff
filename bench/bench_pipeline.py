"""Whole-request benchmark: 10 s of speech to a finished MP4, stage by stage.

    .venv/bin/python bench/bench_pipeline.py [--engine builtin|wav2lip] [--checkpoint PATH|--random-checkpoint]
                                             [--avatar IMG] [--audio WAV] [--seconds 10] [--runs 3]
                                             [--device auto|cpu|cuda] [--concurrency N]
                                             [--precision P] [--mouth-only] [--backend B] [--tree DIR]
                                           [--stream] [--encoder auto|x264|openh264] [--profile] [--timeline]

Prints per-stage times (median of the runs), the real-time factor
(processing time / speech duration; < 1 is faster than real time) and the
frames per second of the whole request. Audio is given (TTS excluded) unless
--text is passed. ``--random-checkpoint`` builds a Wav2Lip checkpoint with
random weights (the published weights run at the same speed).
``--concurrency N`` then runs N requests at once, --runs times, and prints
the wall time per round and the throughput (seconds of video made per
second); ``--processes N`` the same with one request in each of N processes, each with
its own service (as ``GUNICORN_WORKERS=N`` serves them on one machine). ``--tree DIR``
imports ``lipsync`` from another checkout (e.g. the code before a change, for before/after
numbers); the engine options (--precision, --mouth-only, --backend) need this tree's engine, and
``--random-checkpoint`` a tree with ``lipsync.engines.wav2lip.model.save_random_checkpoint``
(with an older one, pass ``--checkpoint``). ``--stream`` asks for the live copy as a streamed
job does and reports ``first_frame``: the time until it holds a playable fragment. ``--encoder``
picks the H.264 encoder (``VIDEO_ENCODER``); ``--profile`` prints a cProfile of one more request,
``--timeline`` when each stage of one more request ran (engine calls, waits on the GPU, every
segment's encoder, the join), in ms from the request's start; with ``--concurrency N`` the
timeline and ``--torch-profile`` cover N more requests at once, and each round of N reports
the CPU seconds it used (the service's process and its ffmpegs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def _tree() -> str:
    """The checkout to import lipsync from: --tree DIR when given, else this one."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--tree" and i + 1 < len(argv):
            return os.path.abspath(argv[i + 1])
        if arg.startswith("--tree="):
            return os.path.abspath(arg.split("=", 1)[1])
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, _tree())

import dataclasses  # noqa: E402
import threading  # noqa: E402

from lipsync import service as service_module  # noqa: E402
from lipsync.media import audio  # noqa: E402
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
    p.add_argument("--random-checkpoint", action="store_true", help="build a random-weights Wav2Lip checkpoint")
    p.add_argument("--device", help="auto, cpu or cuda (default: DEVICE or auto)")
    p.add_argument("--batch-size", type=int, help="Wav2Lip frames per model call")
    p.add_argument("--concurrency", type=int, default=1, help="requests at once (default 1)")
    p.add_argument("--processes", type=int, default=1,
                   help="also N requests at once in N processes, a service each (default 1: not run)")
    p.add_argument("--precision", help="Wav2Lip engine precision: auto, fp32, fp16, int8")
    p.add_argument("--backend", help="Wav2Lip CPU runtime: auto, torch, onnxruntime")
    p.add_argument("--mouth-only", action="store_true", help="compute only the rows the blend mask shows")
    p.add_argument("--preset", help="x264 preset (default: X264_PRESET or veryfast)")
    p.add_argument("--encoder", help="H.264 encoder: auto, x264, openh264 (default: VIDEO_ENCODER or auto)")
    p.add_argument("--face-box", help="x1,y1,x2,y2 face box on the avatar (skips detection)")
    p.add_argument("--tree", help="import lipsync from this checkout (before/after comparisons)")
    p.add_argument("--label", default="", help="a name for this configuration in the output")
    p.add_argument("--profile", action="store_true",
                   help="after the runs, one more under cProfile: where the request's own thread spends its time")
    p.add_argument("--timeline", action="store_true",
                   help="after the runs, one more with its stages timed: when each ran, in which thread")
    p.add_argument("--torch-profile", action="store_true",
                   help="after the runs, one more under torch.profiler: the GPU kernels and torch ops it ran")
    p.add_argument("--stream", action="store_true",
                   help="ask for the live copy too (as a streamed job) and time its first playable fragment")
    args = p.parse_args()

    avatar = args.avatar or os.path.join(FIXTURES, "avatar.jpg")
    overrides = dict(engine=args.engine, avatar_path=avatar if os.path.exists(avatar) else None,
                     max_output_height=args.max_height)
    if args.checkpoint:
        overrides["checkpoint_path"] = args.checkpoint
    if args.device:
        overrides["device"] = args.device
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.preset:
        overrides["x264_preset"] = args.preset
    if args.encoder:
        overrides["video_encoder"] = args.encoder
    if args.face_box:
        overrides["face_box"] = tuple(int(v) for v in args.face_box.split(","))
    engine_options = {k: v for k, v in (("precision", args.precision), ("backend", args.backend)) if v}
    if args.mouth_only:
        engine_options["mouth_only"] = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_checkpoint:
            from lipsync.engines.wav2lip.model import save_random_checkpoint

            overrides["checkpoint_path"] = save_random_checkpoint(os.path.join(tmp, "random_wav2lip.pth"), seed=7)
        fields = {f.name for f in dataclasses.fields(Settings)}
        overrides.update(output_dir=os.path.join(tmp, "out"), cache_dir=os.path.join(tmp, "cache"))
        try:
            settings = Settings.from_env(**{k: v for k, v in overrides.items() if k in fields})
        except Exception as exc:  # noqa: BLE001 - an environment this bench does not need (e.g. rate limits)
            print(f"(settings from the environment failed: {exc}; using defaults)", file=sys.stderr)
            settings = dataclasses.replace(Settings(), **{k: v for k, v in overrides.items() if k in fields})
        if engine_options:
            _engine_options(engine_options)
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
            live = os.path.join(tmp, f"live{i}.mp4") if args.stream else None
            watch = _FirstFrame(live) if live else None
            result = service.generate(out, text=args.text, language=args.language, recording=recording,
                                      live_path=live)
            if watch is not None:  # time from the request's start to the live copy's first fragment
                result.timings["first_frame"] = watch.stop() * 1000.0
            if i:
                runs.append(result)
        concurrent = _concurrent(service, args, recording, tmp) if args.concurrency > 1 else None
        processes = _processes(settings, engine_options, args, recording, tmp) if args.processes > 1 else None
        if args.profile:
            _profile(service, args, recording, os.path.join(tmp, "profiled.mp4"))
        if args.timeline:
            _timeline(service, args, recording, os.path.join(tmp, "timed.mp4"))
        if args.torch_profile:
            _torch_profile(service, args, recording, os.path.join(tmp, "torch-profiled.mp4"))
        info = service.describe()

    stages = sorted({k for r in runs for k in r.timings})
    median = {k: statistics.median(r.timings.get(k, 0.0) for r in runs) for k in stages}
    duration = runs[0].duration
    frames = runs[0].frames
    total_s = median["total"] / 1000.0
    h, w = info["avatar"]["height"], info["avatar"]["width"]
    gpu = ""
    if info.get("device") == "cuda":
        import torch

        gpu = ", " + torch.cuda.get_device_name(0)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus{gpu}"
          f"{'  [' + args.label + ']' if args.label else ''}")
    extra = ", ".join(f"{k} {info[k]}" for k in ("precision", "backend", "mouth_only", "int8_error", "video_encoder")
                      if k in info)
    print(f"engine: {info['engine']} on {info['device']}{' (' + extra + ')' if extra else ''}, avatar {w}x{h}, "
          f"{duration:.2f} s speech, {frames} frames, load {load_s:.2f} s, median of {len(runs)} runs"
          f"{', lib ' + _tree() if args.tree else ''}")
    for k in stages:
        print(f"  {k:<10} {median[k]:9.1f} ms")
    print(f"real-time factor: {total_s / duration:.3f}  ({duration / total_s:.1f}x real time)")
    print(f"frames per second (whole request): {frames / total_s:.1f}")
    print(f"fastest run: {min(r.timings['total'] for r in runs):.1f} ms")
    if info.get("device") == "cuda":
        print(f"GPU memory: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated")
    if concurrent:
        walls = concurrent["walls"]
        wall = statistics.median(walls)
        print(f"{args.concurrency} requests at once: median wall {wall * 1000:.0f} ms per round of "
              f"{args.concurrency} x {duration:.1f} s (best {min(walls) * 1000:.0f} ms) -> "
              f"{args.concurrency * duration / wall:.1f}x real time throughput; "
              f"per-request server time median {statistics.median(concurrent['totals']):.0f} ms")
        own, ffmpeg = statistics.median(concurrent["cpu_own"]), statistics.median(concurrent["cpu_ffmpeg"])
        pools = statistics.median(concurrent["cpu_pools"])
        print(f"  CPU per round (median): service process {own:.2f} CPU-s (its lasting native thread pools: torch, "
              f"OpenCV, BLAS, CUDA {pools:.2f}), its ffmpegs {ffmpeg:.2f} CPU-s -> {(own + ffmpeg) / wall:.1f} of "
              f"{os.cpu_count()} cores busy on average")
        last = concurrent["busiest_pools"][-1]
        if last:
            print("  busiest lasting threads, last round: " + ", ".join(f"{name} {cpu:.2f}" for name, cpu in last))
    if processes:
        wall = statistics.median(processes["walls"])
        print(f"{args.processes} requests at once in {args.processes} processes: median wall {wall * 1000:.0f} ms "
              f"per round (best {min(processes['walls']) * 1000:.0f} ms) -> "
              f"{args.processes * duration / wall:.1f}x real time throughput; "
              f"per-request server time median {statistics.median(processes['totals']):.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "engine": info["engine"], "device": info["device"], "width": w,
                       "height": h, "speech_s": duration, "frames": frames, "stages_ms": median,
                       "rtf": total_s / duration, "fps": frames / total_s, "info": info,
                       "concurrency": args.concurrency, "concurrent": concurrent,
                       "processes": args.processes, "in_processes": processes}, f, indent=2, default=str)
    return 0


class _FirstFrame:
    """Watches a live (fragmented) MP4 from now on: ``stop()`` returns the seconds until it first
    held a playable fragment (``bench_streaming.playable``), inf if it never did."""

    def __init__(self, path: str):
        from bench_streaming import playable

        self.start, self.first = time.perf_counter(), math.inf
        self._done = threading.Event()

        def watch() -> None:
            while not self._done.is_set():
                if playable(path):
                    self.first = time.perf_counter() - self.start
                    return
                time.sleep(0.002)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.first


def _profile(service, args, recording: bytes | None, out: str) -> None:
    """One request under cProfile; prints the functions the request's thread spends most time in
    (its own time: waits on the GPU, the encoders' back-pressure and Python work show up here)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    service.generate(out, text=args.text, language=args.language, recording=recording)
    profiler.disable()
    print("profile of one request (own time, top 25):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


# (module, class or None, function): the stages --timeline times, where the tree has them.
TIMED = (
    ("lipsync.media.audio", None, "melspectrogram"),
    ("lipsync.engines.wav2lip.engine", "Wav2LipEngine", "_render_cuda"),
    ("lipsync.engines.wav2lip.engine", "Wav2LipEngine", "_predict"),
    ("lipsync.media.gpu_frames", "GpuFrames", "_i420"),
    ("lipsync.media.segments", "SegmentedMp4Writer", "_encode"),
    ("lipsync.media.segments", "SegmentedMp4Writer", "_finish"),
    ("lipsync.media.segments", "SegmentedMp4Writer", "_put"),
    ("lipsync.media.video", "Mp4Writer", "_put"),
)


def _timeline(service, args, recording: bytes | None, out: str) -> None:
    """One request with the stages of ``TIMED`` (and every wait on a CUDA event) wrapped: prints
    each stage's calls as first start .. last end (ms from the request's start), how many, and
    their summed time; segment encoders one line each."""
    import functools
    import importlib

    events: list[tuple[str, float, float]] = []
    undo = []

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                if name == "_encode":  # one line per segment
                    events.append((f"{label}[{getattr(a[1], 'index', '?')}]", t, time.perf_counter()))
                elif name == "wait" and hasattr(a[0], "args"):  # which ffmpeg was waited for
                    events.append((f"ffmpeg wait {os.path.basename(str(a[0].args[-1]))}", t, time.perf_counter()))
                else:
                    events.append((label, t, time.perf_counter()))

        setattr(owner, name, timed)
        undo.append((owner, name, original))

    for module, cls, name in TIMED:
        try:
            owner = importlib.import_module(module)
            owner = getattr(owner, cls) if cls else owner
            getattr(owner, name)
        except (ImportError, AttributeError):
            continue
        wrap(owner, name, f"{cls + '.' if cls else ''}{name}")
    import subprocess

    wrap(subprocess.Popen, "wait", "ffmpeg wait")
    try:
        import torch

        if torch.cuda.is_available():
            wrap(torch.cuda.Event, "synchronize", "wait for GPU (Event.synchronize)")
    except ImportError:
        pass
    start = time.perf_counter()
    try:
        _at_once(service, args, recording, _paths(out, args.concurrency))
    finally:
        end = time.perf_counter()
        for owner, name, original in undo:
            setattr(owner, name, original)
    groups: dict[str, list[tuple[float, float]]] = {}
    for label, t0, t1 in events:
        groups.setdefault(label, []).append((t0, t1))
    what = "one request" if args.concurrency == 1 else f"{args.concurrency} requests at once (sums over all)"
    print(f"timeline of {what} ({(end - start) * 1000:.0f} ms), ms from its start:")
    for label, spans in sorted(groups.items(), key=lambda kv: min(t0 for t0, _ in kv[1])):
        first, last = min(t0 for t0, _ in spans), max(t1 for _, t1 in spans)
        busy = sum(t1 - t0 for t0, t1 in spans)
        print(f"  {label:<40} {(first - start) * 1000:7.0f} .. {(last - start) * 1000:7.0f}"
              f"  x{len(spans):<5} sum {busy * 1000:7.0f}")


def _torch_profile(service, args, recording: bytes | None, out: str) -> None:
    """One request under ``torch.profiler`` (CPU and CUDA): prints the ops with the most GPU
    time, then those with the most CPU time (the request's thread launching them)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        wall, _ = _at_once(service, args, recording, _paths(out, args.concurrency))
    table = prof.key_averages()
    what = "one request" if args.concurrency == 1 else f"{args.concurrency} requests at once"
    print(f"torch profile of {what}: {wall * 1000:.0f} ms wall (under the profiler)")
    if torch.cuda.is_available():
        print("torch ops and kernels by GPU time:")
        print(table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print("torch ops by CPU time:")
    print(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


def _engine_options(options: dict) -> None:
    """Make the service build its Wav2Lip engine with ``options`` (precision, backend, mouth_only)."""
    from lipsync.engines.wav2lip.engine import Wav2LipEngine

    def create_engine(settings):
        checkpoint = service_module.find_checkpoint(settings)
        if checkpoint is None:
            raise SystemExit("--precision/--backend/--mouth-only need a Wav2Lip checkpoint")
        return Wav2LipEngine(checkpoint, device=settings.device, batch_size=settings.batch_size, **options)

    service_module.create_engine = create_engine


def _at_once(service, args, recording: bytes | None, paths: list[str]) -> tuple[float, list]:
    """One request per path in ``paths``, all started together (a barrier), each in its own
    thread; returns (wall seconds from the first start to the last finish, the results)."""
    results: list = [None] * len(paths)
    errors: list = []
    barrier = threading.Barrier(len(paths))

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = service.generate(paths[i], text=args.text, language=args.language, recording=recording)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), name=f"request-{i}") for i in range(len(paths))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise errors[0]
    return wall, results


def _paths(out: str, count: int) -> list[str]:
    """``out`` for one request, else ``count`` paths beside it."""
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext}" for i in range(count)]


def _cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, its finished child processes' (the ffmpegs')), user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _lasting_threads_cpu() -> dict[int, tuple[str, float]]:
    """Thread id -> (name, CPU seconds used so far) of this process's threads but the main one
    that are alive now (Linux; empty elsewhere). Between rounds those are the native pools that
    outlive requests: torch's, OpenCV's and BLAS's worker threads, CUDA's; the requests' own
    threads have ended. (A BLAS pool busy here while the requests do no BLAS work is spinning.)"""
    main = threading.main_thread().native_id
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    threads = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return threads
    for tid in map(int, tasks):
        if tid == main:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        threads[tid] = (name, (int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
    return threads


def _pools_used(before: dict, after: dict) -> tuple[float, list[tuple[str, float]]]:
    """The lasting threads' CPU seconds between two ``_lasting_threads_cpu()``s, and the busiest few."""
    used = sorted(((name, cpu - before.get(tid, (name, 0.0))[1]) for tid, (name, cpu) in after.items()),
                  key=lambda item: -item[1])
    return sum(cpu for _, cpu in used), [item for item in used[:4] if item[1] > 0]


def _concurrent(service, args, recording: bytes | None, tmp: str) -> dict:
    """``args.concurrency`` requests at once, ``args.runs`` rounds (after one warm-up round); with
    each round's CPU seconds, the service's process and its ffmpegs apart (every ffmpeg of a
    request has been waited for when the request returns), and of the process's the part its
    lasting native thread pools used."""
    walls, totals, cpu_own, cpu_ffmpeg, cpu_pools, busiest_pools = [], [], [], [], [], []
    for round_ in range(args.runs + 1):
        paths = _paths(os.path.join(tmp, f"c{round_}.mp4"), args.concurrency)
        own0, children0 = _cpu_seconds()
        pools0 = _lasting_threads_cpu()
        wall, results = _at_once(service, args, recording, paths)
        own1, children1 = _cpu_seconds()
        pools, busiest = _pools_used(pools0, _lasting_threads_cpu())
        if round_:
            walls.append(wall)
            totals.extend(r.timings["total"] for r in results)
            cpu_own.append(own1 - own0)
            cpu_ffmpeg.append(children1 - children0)
            cpu_pools.append(pools)
            busiest_pools.append(busiest)
        for path in paths:
            os.remove(path)
    return {"walls": walls, "totals": totals, "cpu_own": cpu_own, "cpu_ffmpeg": cpu_ffmpeg, "cpu_pools": cpu_pools,
            "busiest_pools": busiest_pools}


def _processes(settings, engine_options: dict, args, recording: bytes | None, tmp: str) -> dict:
    """``args.processes`` requests at once, one in each of as many processes (a service each, warmed
    by one request first), ``args.runs`` rounds; a round's wall time runs from the first start to
    the last finish."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    n = args.processes
    barrier, results = context.Barrier(n + 1), context.Queue()
    children = [context.Process(target=_process_worker, daemon=True,
                                args=(i, settings, engine_options, args.text, args.language, recording, tmp,
                                      args.runs, barrier, results))
                for i in range(n)]
    for child in children:
        child.start()
    for _ in range(args.runs + 1):  # the services loaded, then every round started together
        barrier.wait()
    done = [results.get() for _ in range(n * args.runs)]
    for child in children:
        child.join()
    if any(isinstance(item, str) for item in done):
        raise RuntimeError(next(item for item in done if isinstance(item, str)))
    walls = [max(end for r, _, end, _ in done if r == k) - min(start for r, start, _, _ in done if r == k)
             for k in range(args.runs)]
    return {"walls": walls, "totals": [total for *_, total in done]}


def _process_worker(i: int, settings, engine_options: dict, text, language, recording, tmp: str, rounds: int,
                    barrier, results) -> None:
    """One process of ``_processes``: its own service; one warm-up request, then ``rounds`` requests,
    each started when every process is ready; puts (round, start, end, server ms) per request (wall
    clock, comparable across processes), or the error's text."""
    try:
        if engine_options:
            _engine_options(engine_options)
        service = LipsyncService(settings).load()
        if service.status != "ready":
            raise RuntimeError(f"service failed to load: {service.error}")
        service.generate(os.path.join(tmp, f"p{i}-warm.mp4"), text=text, language=language, recording=recording)
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        results.put(f"process {i}: {exc!r}")
        for _ in range(rounds + 1):
            barrier.wait()
        return
    barrier.wait()
    for k in range(rounds):
        barrier.wait()
        start = time.time()
        result = service.generate(os.path.join(tmp, f"p{i}-{k}.mp4"), text=text, language=language,
                                  recording=recording)
        results.put((k, start, time.time(), result.timings["total"]))


if __name__ == "__main__":
    raise SystemExit(main())
