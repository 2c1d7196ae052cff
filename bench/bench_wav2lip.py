"""Wav2Lip speed paths, generator and engine: frames per second and error against fp32.

    .venv/bin/python bench/bench_wav2lip.py [--device cpu|cuda] [--batch N] [--rounds N]
                                            [--checkpoint PATH] [--variants a,b,...] [--json FILE]

Runs on a CPU machine or a CUDA machine, no network. Without --checkpoint a
generator with random weights is built (same speed as the published ones;
BatchNorm statistics measured on random input, as in the tests). Inputs are
real: the fixture avatar's face crop and mel windows of the fixture speech
(LIPSYNC_FIXTURES or ../shared/fixtures; synthetic when missing).

Generator variants (one call = one batch of --batch frames):

  eager-forward   Wav2Lip.forward in fp32: face encoder every frame (plain PyTorch)
  eager-decode    the face features once, Wav2Lip.decode per batch (the engine before)
  eager-decode-cl   same, channels-last (CUDA: fp16, the engine before on a GPU)
  still           StillFaceDecoder: BatchNorm folded, face terms precomputed, channels-last
  still-mouth     the same computing only rows 40..95 (what the blend mask shows)
  still-graph / still-mouth-graph   CUDA: the same replayed as a CUDA graph (fp16)
  ort-fp32 / ort-fp32-mouth         CPU: ONNX Runtime fp32
  ort-int8 / ort-int8-mouth         CPU: ONNX Runtime static int8 (QDQ, per channel)

Then engine variants: Wav2LipEngine.render of --engine-seconds of speech
(mel, model, resize to the 720p region, uint8): frames per second, and the
patches' error against the fp32 CPU engine (max and mean, in 1/255, over the
pixels the blend mask shows).

CPU timing: variants take turns, --rounds rounds, the best and the median
round reported (other processes on a shared machine only ever slow a round
down). CUDA timing: synchronised, median of --rounds. Error columns: mean
and max absolute difference from the fp32 eager reference, in 1/255 of a
pixel, over the rows the variant computes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
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

from lipsync.engines.wav2lip.model import (  # noqa: E402
    StillFaceDecoder,
    Wav2Lip,
    load_model,
    mouth_rows_start,
    random_generator,
    save_random_checkpoint,
)
from lipsync.media import audio  # noqa: E402

FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))
BOX = (420, 137, 885, 612)  # the fixture avatar's face region (padded box), x1 y1 x2 y2
MOUTH_ROWS = mouth_rows_start(0.46)


def inputs(batch: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
    """(mel windows (N, 1, 80, 16), faces (1, 6, 96, 96), avatar image, speech samples)."""
    image_path, wav_path = FIXTURES / "avatar.jpg", FIXTURES / "kennedy_speech_16k.wav"
    image = cv2.imread(str(image_path)) if image_path.exists() else None
    if image is None:
        rng = np.random.default_rng(0)
        image = cv2.GaussianBlur(rng.integers(0, 256, (1483, 1290, 3), dtype=np.uint8), (0, 0), 5)
    if wav_path.exists():
        samples = audio.load_audio(str(wav_path))
    else:
        t = np.arange(7 * audio.SAMPLE_RATE) / audio.SAMPLE_RATE
        samples = (0.3 * np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    x1, y1, x2, y2 = BOX
    face = cv2.resize(image[y1:y2, x1:x2], (96, 96), interpolation=cv2.INTER_AREA)
    masked = face.copy()
    masked[48:] = 0
    faces = torch.from_numpy(np.concatenate([masked, face], 2).transpose(2, 0, 1)[None].astype(np.float32) / 255)
    windows = audio.mel_windows(audio.melspectrogram(samples), 25)[:, None].astype(np.float32)
    skip = 38  # past the fixture's leading silence
    reps = int(np.ceil((batch + skip) / len(windows)))
    windows = np.concatenate([windows] * reps)[skip:skip + batch]
    return windows, faces, image, samples


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
                         if f" {f}" in text)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {cpu} ({flags}), {os.cpu_count()} cpus, {gpu}, torch {torch.__version__}"


def err255(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    d = np.abs(got.astype(np.float64) - want.astype(np.float64)) * 255.0
    return float(d.mean()), float(d.max())


# ------------------------------------------------------------------------ generator variants


def generator_variants(model: Wav2Lip, faces: torch.Tensor, mel: np.ndarray, device: torch.device,
                       names: list[str]) -> dict:
    """name -> (callable returning a (B, 3, rows, 96) float32 numpy array, rows_from)."""
    cuda = device.type == "cuda"
    mel_t = torch.from_numpy(mel)
    out: dict = {}
    with torch.inference_mode():
        fp32 = copy.deepcopy(model).to(device).float()
        feats32 = fp32.encode_faces(faces.to(device))
        m_dev = mel_t.to(device)
        f_dev = faces.to(device).expand(len(mel), -1, -1, -1).contiguous()

        def sync(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        out["eager-forward"] = (lambda: sync(fp32(m_dev, f_dev)), 0)
        out["eager-decode"] = (lambda: sync(fp32.decode(m_dev, feats32)), 0)
        half = torch.float16 if cuda else torch.float32
        cl = Wav2Lip()
        cl.load_state_dict(model.state_dict())
        cl = cl.eval().to(device, half).to(memory_format=torch.channels_last)
        feats_cl = [f.to(half).contiguous(memory_format=torch.channels_last) for f in feats32]
        m_cl = m_dev.to(half).contiguous(memory_format=torch.channels_last)
        out["eager-decode-cl"] = (lambda: sync(cl.decode(m_cl, feats_cl)), 0)
        for rows, suffix in ((0, ""), (MOUTH_ROWS, "-mouth")):
            dec32 = StillFaceDecoder(model, rows).eval()
            consts32 = dec32.constants([f.cpu() for f in feats32])
            dec = StillFaceDecoder(model, rows).eval().to(device, half).to(
                memory_format=torch.channels_last)
            consts = [c.to(device, half).contiguous(memory_format=torch.channels_last) for c in consts32]
            m_in = m_dev.to(half)
            out[f"still{suffix}"] = (lambda d=dec, c=consts, m=m_in: sync(d(m, *c)), rows)
            if cuda and f"still{suffix}-graph" in names:
                from lipsync.engines.wav2lip.engine import _CudaGraphDecoder

                class _S:  # a stand-in for the engine's per-avatar state
                    constants = consts

                runner = _CudaGraphDecoder(dec, half, torch.channels_last)
                state = _S()
                out[f"still{suffix}-graph"] = (lambda r=runner, s=state, m=m_in: sync(r(m, s)), rows)
            if not cuda and any(n.startswith("ort") for n in names):
                from lipsync.engines.wav2lip import onnx_backend

                if onnx_backend.available():
                    for precision in ("fp32", "int8"):
                        name = f"ort-{precision}{suffix}"
                        if name not in names:
                            continue
                        t = time.perf_counter()
                        ort = onnx_backend.OrtDecoder(dec32, consts32, precision=precision)
                        print(f"  built {name} in {time.perf_counter() - t:.1f} s"
                              + (f" (self-check error {ort.error:.2f}/255)" if ort.error is not None else ""),
                              flush=True)
                        np_consts = ort.numpy_constants(consts32)
                        out[name] = (lambda o=ort, c=np_consts: o(mel, c), rows)
    return {k: v for k, v in out.items() if k in names}


def time_variants(variants: dict, device: torch.device, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn, _ in variants.values():  # warm up (allocators, cuDNN/oneDNN choices, graph capture)
            fn()
            fn()
        for _ in range(rounds):
            for name, (fn, _) in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()  # returns host numpy: synchronised
                times[name].append(time.perf_counter() - t)
    return times


# ------------------------------------------------------------------------ engine variants


def engine_variants(checkpoint: str, device: str, batch: int, names: list[str]) -> dict:
    from lipsync.engines.wav2lip.engine import Wav2LipEngine

    configs = {
        "engine-before": None,
        "engine-fp32": dict(precision="fp32"),
        "engine-fp32-mouth": dict(precision="fp32", mouth_only=True),
        "engine-ort-fp32": dict(precision="fp32", backend="onnxruntime"),
        "engine-ort-fp32-mouth": dict(precision="fp32", backend="onnxruntime", mouth_only=True),
        "engine-int8-mouth": dict(precision="int8", mouth_only=True, int8_max_error=float("inf")),
        "engine-fp16": dict(precision="fp16"),
        "engine-fp16-mouth": dict(precision="fp16", mouth_only=True),
        "engine-fp16-nograph": dict(precision="fp16", cuda_graphs=False),
    }
    out = {}
    for name in names:
        if name not in configs:
            continue
        if name == "engine-before":
            cls = _head_engine_class()
            if cls is None:
                continue
            out[name] = cls(checkpoint, device=device, batch_size=batch)
            continue
        try:
            out[name] = Wav2LipEngine(checkpoint, device=device, batch_size=batch, **configs[name])
        except Exception as exc:  # noqa: BLE001 - a variant this machine cannot run
            print(f"  {name}: skipped ({exc})")
    return out


def _head_engine_class():
    """The engine as committed before these speed paths (.benchdata/head or BENCH_BEFORE_TREE), if present."""
    import importlib.util

    tree = Path(os.environ.get("BENCH_BEFORE_TREE", REPO / ".benchdata" / "head"))
    path = tree / "lipsync" / "engines" / "wav2lip.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("before_wav2lip_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Wav2LipEngine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="frames per generator call (default 32 CPU, 250 CUDA)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch/ONNX Runtime threads (default: all cores)")
    p.add_argument("--checkpoint", help="a Wav2Lip checkpoint (default: random weights)")
    p.add_argument("--variants", help="comma-separated names (default: all that fit the device)")
    p.add_argument("--engine-seconds", type=float, default=4.0, help="speech rendered per engine variant")
    p.add_argument("--engine-batch", type=int, help="engine batch size (default 32 CPU, 64 CUDA)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:  # the fp32 reference is true fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    batch = args.batch or (250 if cuda else 32)
    default = (["eager-forward", "eager-decode", "eager-decode-cl", "still", "still-mouth", "still-graph",
                "still-mouth-graph", "engine-before", "engine-fp16", "engine-fp16-nograph", "engine-fp16-mouth",
                "engine-fp32"]
               if cuda else
               ["eager-forward", "eager-decode", "eager-decode-cl", "still", "still-mouth", "ort-fp32",
                "ort-fp32-mouth", "ort-int8", "ort-int8-mouth", "engine-before", "engine-fp32", "engine-fp32-mouth",
                "engine-ort-fp32", "engine-ort-fp32-mouth", "engine-int8-mouth"])
    names = args.variants.split(",") if args.variants else default

    print(f"machine: {machine()}")
    print(f"date: {datetime.date.today()}  device: {device}  threads: {torch.get_num_threads()}  "
          f"batch: {batch}  rounds: {args.rounds}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model = load_model(args.checkpoint)
            checkpoint = args.checkpoint
        else:
            model = random_generator(7)
            checkpoint = save_random_checkpoint(os.path.join(tmp, "random_wav2lip.pth"), model=model)
        mel, faces, image, samples = inputs(batch)
        results: dict = {"machine": machine(), "date": str(datetime.date.today()), "device": str(device),
                         "batch": batch, "threads": torch.get_num_threads(), "generator": {}, "engine": {}}

        variants = generator_variants(model, faces, mel, device, names)
        if variants:
            ref_fn = variants.get("eager-decode") or generator_variants(model, faces, mel, device,
                                                                        ["eager-decode"])["eager-decode"]
            with torch.inference_mode():
                reference = ref_fn[0]()
            times = time_variants(variants, device, args.rounds)
            base = None
            print(f"\ngenerator, {batch} frames a call        best fps  median fps  vs eager-forward  "
                  f"err mean/255  err max/255")
            for name, (fn, rows) in variants.items():
                best, med = batch / min(times[name]), batch / statistics.median(times[name])
                with torch.inference_mode():
                    got = fn()
                mean, worst = err255(got, reference[:, :, rows:])
                base = base or (best if name == "eager-forward" else None)
                ratio = f"{best / base:6.2f}x" if base else "    -"
                print(f"  {name:<34} {best:9.1f} {med:11.1f}  {ratio:>16}  {mean:12.3f}  {worst:11.3f}", flush=True)
                results["generator"][name] = {"best_fps": best, "median_fps": med, "err_mean": mean,
                                              "err_max": worst, "rows_from": rows}

        engines = engine_variants(checkpoint, str(device), args.engine_batch or (64 if cuda else 32), names)
        if engines:
            from lipsync.engines.wav2lip.engine import Wav2LipEngine
            from lipsync.faces.box import FaceBox
            from lipsync.tts.base import Speech

            speech = Speech(np.tile(samples, 4)[int(1.5 * audio.SAMPLE_RATE):][:int(args.engine_seconds * 16000)])
            box = FaceBox(BOX[0], BOX[1], BOX[2], BOX[3] - 10)
            scale = 720 / image.shape[0]
            small = cv2.resize(image, (round(image.shape[1] * scale) // 2 * 2, 720), interpolation=cv2.INTER_AREA)
            small_box = box.scaled(scale).clip(small.shape[1], small.shape[0])
            ref_engine = Wav2LipEngine(checkpoint, device="cpu", batch_size=32, precision="fp32")
            ref_avatar = ref_engine.prepare(small, small_box)
            reference = np.concatenate(list(ref_engine.render(ref_avatar, speech, 25)))
            shown = ref_avatar.mask[..., 0] > 0
            print(f"\nengine render, {args.engine_seconds:.0f} s speech at 25 fps, 720p avatar "
                  f"(region {ref_avatar.region.width}x{ref_avatar.region.height})")
            print("  variant                      best fps  median fps  err mean/255  err max/255 "
                  "(pixels the mask shows, vs the fp32 CPU engine)")
            prepared = {name: e.prepare(small, small_box) for name, e in engines.items()}
            etimes: dict[str, list[float]] = {n: [] for n in engines}
            outputs = {}
            for name, e in engines.items():  # warm up
                outputs[name] = np.concatenate(list(e.render(prepared[name], speech, 25)))
            for _ in range(max(2, args.rounds // 2)):
                for name, e in engines.items():
                    t = time.perf_counter()
                    for _b in e.render(prepared[name], speech, 25):
                        pass
                    etimes[name].append(time.perf_counter() - t)
            frames = len(reference)
            before = outputs.get("engine-before")
            for name, e in engines.items():
                got = outputs[name]
                d = np.abs(got.astype(np.int16) - reference.astype(np.int16))[:, shown]
                best, med = frames / min(etimes[name]), frames / statistics.median(etimes[name])
                extra = e.describe().get("int8_error") if hasattr(e, "describe") else None
                vs_before = ""
                row = {"best_fps": best, "median_fps": med, "err_mean": float(d.mean()), "err_max": int(d.max()),
                       "frames": frames}
                if before is not None and name != "engine-before":
                    b = np.abs(got.astype(np.int16) - before.astype(np.int16))[:, shown]
                    vs_before = f"   vs engine-before: mean {b.mean():.3f} max {b.max()}"
                    row.update(before_err_mean=float(b.mean()), before_err_max=int(b.max()))
                print(f"  {name:<26} {best:10.1f} {med:11.1f}  {d.mean():12.3f}  {d.max():11d}" + vs_before
                      + (f"   (int8 self-check {extra:.2f}/255)" if extra is not None else ""), flush=True)
                results["engine"][name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
