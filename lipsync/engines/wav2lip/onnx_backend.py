"""ONNX Runtime back end for the Wav2Lip engine on CPUs: fp32 and static int8.

The per-frame network (``lipsync.engines.wav2lip.model.StillFaceDecoder``: audio encoder
plus decoder, BatchNorm folded, the face features' share precomputed per
avatar) is exported once per engine with the per-avatar constants as graph
inputs, so a new avatar needs no new export. ``precision="int8"`` quantises
it statically (QDQ, int8 weights per output channel, uint8 activations),
calibrated on the avatar's constants and speech-like mel windows, then checks
itself against fp32 on held-out windows: ``error`` is that mean absolute
difference in 1/255 units of the generated face.

Optional dependency: ``onnxruntime`` (runtime, both precisions) and ``onnx``
(only to quantise). Import this module only when they are wanted.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch

from lipsync.engines.wav2lip.model import MEL_BINS, MEL_STEPS, StillFaceDecoder
from lipsync.errors import LipsyncError
from lipsync.media import audio

log = logging.getLogger("lipsync")

PRECISIONS = ("fp32", "int8")


def available() -> bool:
    """Whether this backend can run: onnxruntime to run, onnx for torch's exporter (nothing imported)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def speechlike_mel_windows(count: int = 96, fps: int = 25, seed: int = 0) -> np.ndarray:
    """``count`` mel windows (count, 1, 80, 16) of synthetic, speech-like sound.

    Voiced stretches (a glottal pulse train with a wandering pitch through
    three moving formants), noise bursts and pauses at a syllable rate, so the
    windows span the value range real speech gives (silence at -4 to loud
    vowels) without shipping a recording. Deterministic for a seed. Used to
    calibrate int8 activation ranges.
    """
    rng = np.random.default_rng(seed)
    sr = audio.SAMPLE_RATE
    seconds = count / fps + 0.5
    n = int(seconds * sr)
    out = np.zeros(n, np.float32)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.08, 0.3) * sr)
        kind = rng.choice(["voiced", "voiced", "voiced", "noise", "pause"])
        seg = np.zeros(length, np.float64)
        t = np.arange(length) / sr
        if kind == "voiced":
            f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
            phase = np.cumsum(f0 / sr)
            for h in range(1, 40):
                freq = h * f0
                gain = sum(
                    np.exp(-(((freq - fc) / bw) ** 2))
                    for fc, bw in (
                        (rng.uniform(300, 900), 120),
                        (rng.uniform(900, 2500), 200),
                        (rng.uniform(2400, 3500), 300),
                    )
                )
                seg += (gain + 0.02) / h * np.sin(2 * np.pi * h * phase) * (freq < 7600)
        elif kind == "noise":
            seg = rng.standard_normal(length) * np.hanning(length) * 0.3
        env = np.hanning(length) ** 0.5 * rng.uniform(0.05, 0.6)
        seg = seg / (np.abs(seg).max() + 1e-9) * env
        end = min(n, pos + length)
        out[pos:end] = seg[: end - pos]
        pos = end
    windows = audio.mel_windows(audio.melspectrogram(out), fps)[:count]
    return windows[:, None].astype(np.float32)


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between runs: the engine's resize, compositing and ffmpeg share these cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class OrtDecoder:
    """``StillFaceDecoder`` run by ONNX Runtime on the CPU.

    ``decoder``: a float32 CPU ``StillFaceDecoder``. ``constants``: its
    ``constants()`` for a representative avatar (used for export shapes and,
    for int8, calibration). ``threads``: intra-op threads (default: torch's).
    ``__call__(mel, constants)`` -> (B, 3, 96 - rows_from, 96) float32.
    Raises ``LipsyncError`` (code ``onnxruntime_missing``) when the packages
    are not installed.
    """

    def __init__(
        self,
        decoder: StillFaceDecoder,
        constants: Sequence[torch.Tensor],
        precision: str = "fp32",
        threads: int | None = None,
        calibration: np.ndarray | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise LipsyncError(
                "WAV2LIP_PRECISION=int8 / the onnxruntime back end needs the onnxruntime package "
                "(pip install onnxruntime)",
                code="onnxruntime_missing",
            ) from None
        self.precision = precision
        self.rows_from = decoder.rows_from
        self.names = ["mel"] + [f"const{i}" for i in range(len(constants))]
        self.error: float | None = None
        self.build_seconds = 0.0
        threads = threads or torch.get_num_threads()
        started = time.perf_counter()
        consts = [c.detach().float().cpu().contiguous() for c in constants]
        with tempfile.TemporaryDirectory(prefix="wav2lip-onnx-") as tmp:
            fp32_path = os.path.join(tmp, "decoder.onnx")
            mel = torch.zeros(2, 1, MEL_BINS, MEL_STEPS)
            _export(decoder.float().cpu().eval(), (mel, *consts), fp32_path, self.names)
            path = fp32_path
            if precision == "int8":
                windows = calibration if calibration is not None else speechlike_mel_windows(96)
                held_out, calib = windows[::4], np.delete(windows, np.s_[::4], axis=0)
                path = os.path.join(tmp, "decoder.int8.onnx")
                _quantize(fp32_path, path, self._feeds(calib, consts, batch=16))
                reference = _session(fp32_path, threads)
            self._session = _session(path, threads)
            if precision == "int8":
                feed = self._feed(held_out, consts)
                want = reference.run(None, feed)[0]
                got = self._session.run(None, feed)[0]
                self.error = float(np.abs(got - want).mean() * 255.0)
        self.build_seconds = time.perf_counter() - started
        log.info(
            "onnxruntime %s decoder built in %.1f s%s",
            precision,
            self.build_seconds,
            f", mean error {self.error:.2f}/255 vs fp32" if self.error is not None else "",
        )

    def _feed(self, mel: np.ndarray, constants: Sequence[torch.Tensor | np.ndarray]) -> dict:
        values = [np.ascontiguousarray(mel, dtype=np.float32)]
        values += [
            c.detach().float().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c, np.float32)
            for c in constants
        ]
        return dict(zip(self.names, values))

    def _feeds(self, windows: np.ndarray, constants, batch: int) -> list[dict]:
        return [self._feed(windows[i : i + batch], constants) for i in range(0, len(windows), batch)]

    def numpy_constants(self, constants: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Per-avatar constants as the float32 arrays ``__call__`` takes (convert once per avatar)."""
        return [np.ascontiguousarray(c.detach().float().cpu().numpy()) for c in constants]

    def __call__(self, mel: np.ndarray, constants: Sequence[np.ndarray]) -> np.ndarray:
        return self._session.run(None, self._feed(mel, constants))[0]


def _export(module: torch.nn.Module, args: tuple, path: str, names: list[str]) -> None:
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = dict(
            input_names=names,
            output_names=["face"],
            opset_version=17,
            dynamic_axes={"mel": {0: "batch"}, "face": {0: "batch"}},
        )
        try:
            torch.onnx.export(module, args, path, dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(module, args, path, **kwargs)


def _quantize(src: str, dst: str, feeds: list[dict]) -> None:
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError:
        raise LipsyncError(
            "int8 needs the onnx package to quantise the model (pip install onnx)", code="onnxruntime_missing"
        ) from None

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    quantize_static(
        src,
        dst,
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
