"""Audio decoding and the mel features Wav2Lip was trained on.

The constants and the feature recipe follow ``shared/spec/WAV2LIP.md``
exactly; published checkpoints give garbage with anything else.
"""

from __future__ import annotations

import functools
import os
import struct
import tempfile

import numpy as np

from lipsync.errors import InvalidInputError
from lipsync.media.ffmpeg import run_ffmpeg

SAMPLE_RATE = 16000
N_FFT = 800
HOP_LENGTH = 200  # 12.5 ms: 80 mel frames per second
WIN_LENGTH = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
MEL_FRAMES_PER_SECOND = SAMPLE_RATE / HOP_LENGTH
MEL_STEP_SIZE = 16  # mel columns seen by the model per video frame (0.2 s)


def load_audio(source: str | bytes, sr: int = SAMPLE_RATE, timeout: float = 120.0,
               max_seconds: float | None = None) -> np.ndarray:
    """Decode any audio file ffmpeg understands to mono float32 at ``sr`` Hz.

    ``source`` is a path or the file's bytes. Returns shape (n,), values in
    [-1, 1]. With ``max_seconds``, decoding stops one second past it (so a
    caller can tell "too long" without decoding an hour of audio). Raises
    ``InvalidInputError`` (code ``invalid_audio``) when the input cannot be
    decoded or holds no sound samples.
    """
    if isinstance(source, (bytes, bytearray)):
        # Formats like MP4/M4A keep their index at the end and need a seekable
        # input, so bytes go through a private temporary file, not a pipe.
        with tempfile.TemporaryDirectory(prefix="lipsync-audio-") as tmp:
            path = os.path.join(tmp, "input")
            with open(path, "wb") as f:
                f.write(source)
            return load_audio(path, sr, timeout, max_seconds)
    limit = ["-t", f"{max_seconds + 1.0:.3f}"] if max_seconds is not None else []
    raw = run_ffmpeg(["-i", source, "-vn", *limit, "-f", "s16le", "-acodec", "pcm_s16le",
                      "-ac", "1", "-ar", str(sr), "pipe:1"],
                     timeout=timeout, error=_invalid_audio, what="could not decode the audio")
    samples = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
    if samples.size == 0:
        raise InvalidInputError("the audio contains no sound samples", code="invalid_audio")
    return samples


def _invalid_audio(message: str) -> InvalidInputError:
    return InvalidInputError(message, code="invalid_audio")


# 16-bit mono PCM WAV with the canonical 44-byte header: what pcm_wav writes and pcm_from_wav reads.
_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


def pcm_wav(pcm: bytes, sr: int = SAMPLE_RATE) -> bytes:
    """16-bit little-endian mono samples ``pcm`` as WAV file bytes (canonical 44-byte header)."""
    pcm = bytes(pcm[: len(pcm) // 2 * 2])
    header = _WAV_HEADER.pack(b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, 1, sr, sr * 2, 2, 16,
                              b"data", len(pcm))
    return header + pcm


def pcm_from_wav(data, sr: int = SAMPLE_RATE) -> bytes | None:
    """The samples of ``data`` when it is exactly what ``pcm_wav`` writes at ``sr`` Hz (16-bit mono
    PCM, the canonical header, whole samples, sizes that match); None for anything else."""
    if len(data) < _WAV_HEADER.size:
        return None
    riff, riff_size, wave_id, fmt, fmt_size, tag, channels, rate, byte_rate, align, bits, data_id, size = \
        _WAV_HEADER.unpack_from(data)
    if (riff, wave_id, fmt, fmt_size, tag, channels, rate, byte_rate, align, bits, data_id) != \
            (b"RIFF", b"WAVE", b"fmt ", 16, 1, 1, sr, sr * 2, 2, 16, b"data"):
        return None
    if size != len(data) - _WAV_HEADER.size or riff_size != len(data) - 8 or size % 2:
        return None
    return bytes(data[_WAV_HEADER.size:])


def write_wav(path: str, samples: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Write float samples in [-1, 1], shape (n,), as 16-bit mono PCM WAV."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with open(path, "wb") as f:
        f.write(pcm_wav(pcm.tobytes(), sr))


@functools.lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """Slaney-style mel filterbank, (N_MELS, N_FFT // 2 + 1) float64.

    The same matrix as ``librosa.filters.mel(sr=16000, n_fft=800, n_mels=80,
    fmin=55, fmax=7600)`` (htk=False, norm="slaney"), without librosa.
    """
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        f_sp = 200.0 / 3
        mels = f / f_sp
        min_log_hz = 1000.0
        min_log_mel = min_log_hz / f_sp
        logstep = np.log(6.4) / 27.0
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        f_sp = 200.0 / 3
        freqs = f_sp * m
        min_log_hz = 1000.0
        min_log_mel = min_log_hz / f_sp
        logstep = np.log(6.4) / 27.0
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)

    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(FMIN), hz_to_mel(FMAX), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    return weights


@functools.lru_cache(maxsize=1)
def _mel_bands() -> tuple[tuple[int, int, np.ndarray], ...]:
    """Each mel filter's run of non-zero weights: (first bin, last bin + 1, (n,) float64 weights).
    The filterbank is 98 % zeros (739 of 32080 weights)."""
    bands = []
    for weights in mel_filters():
        nonzero = np.flatnonzero(weights)
        start, stop = int(nonzero[0]), int(nonzero[-1]) + 1
        bands.append((start, stop, weights[start:stop].copy()))
    return tuple(bands)


@functools.lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    n = np.arange(WIN_LENGTH)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / WIN_LENGTH)  # periodic, as scipy/librosa "hann"


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised log-mel spectrogram.

    ``wav``: (n,) float waveform at 16 kHz. Returns (80, 1 + n // 200)
    float32 in [-4, 4], 80 columns per second.
    """
    wav = np.asarray(wav, dtype=np.float64)
    emphasised = np.append(wav[:1], wav[1:] - PREEMPHASIS * wav[:-1]) if wav.size else wav
    pad = N_FFT // 2
    # Reflect padding needs more than `pad` samples; very short clips are
    # zero-extended first so they still give one column per hop.
    if emphasised.size <= pad:
        emphasised = np.pad(emphasised, (0, pad + 1 - emphasised.size))
    padded = np.pad(emphasised, pad, mode="reflect")
    n_frames = 1 + (padded.size - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP_LENGTH, padded.strides[0]))
    spectrum = np.abs(np.fft.rfft(frames * _hann_window(), axis=1))  # (n_frames, 401)
    # mel_filters() @ spectrum.T, each filter over its own bins only, without BLAS: a dense
    # product woke BLAS's 16 threads per request, which then spun for tens of milliseconds and
    # took 2.3-2.8 of the 6.2-6.9 CPU-s of four requests at once on a 16-core GPU machine (docs/PERFORMANCE.md,
    # "Issue 14, seventh round"). The zeros it skips add nothing: the same sums within 1e-16.
    mel = np.empty((N_MELS, len(spectrum)))
    for row, (start, stop, weights) in zip(mel, _mel_bands()):
        np.einsum("tk,k->t", spectrum[:, start:stop], weights, out=row)
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    normed = np.clip(2 * MAX_ABS_VALUE * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS_VALUE,
                     -MAX_ABS_VALUE, MAX_ABS_VALUE)
    return normed[:, : 1 + wav.size // HOP_LENGTH].astype(np.float32)


def frame_count(n_samples: int, fps: float) -> int:
    """Video frames for ``n_samples`` of 16 kHz audio: one per mel window start."""
    mel_columns = 1 + n_samples // HOP_LENGTH
    return int(np.ceil(mel_columns * fps / MEL_FRAMES_PER_SECOND))


def frame_loudness(samples: np.ndarray, n_frames: int, fps: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(n_frames,) float32 in [0, 1]: each video frame's RMS level over its own samples,
    relative to the loudest frame (0 for frames past the end, all 0 for silence)."""
    x = np.asarray(samples, dtype=np.float32).ravel()
    hop = sr / float(fps)
    edges = np.minimum((np.arange(n_frames + 1) * hop).astype(np.int64), x.size)
    power = np.add.reduceat(np.append(x * x, 0.0), edges[:-1]) if n_frames else np.zeros(0)
    counts = np.maximum(np.diff(edges), 1)
    rms = np.sqrt(np.where(np.diff(edges) > 0, power / counts, 0.0))
    peak = float(rms.max()) if rms.size else 0.0
    return (rms / peak if peak > 0 else rms).astype(np.float32)


def mel_windows(mel: np.ndarray, fps: float) -> np.ndarray:
    """The model's audio input for every video frame.

    ``mel``: (80, T). Returns (N, 80, 16) float32 with N = number of windows
    starting inside the mel; window i starts at column int(i * 80 / fps), and
    windows running past the end use the last 16 columns.
    """
    n = int(np.ceil(mel.shape[1] * fps / MEL_FRAMES_PER_SECOND))
    if mel.shape[1] < MEL_STEP_SIZE:
        mel = np.pad(mel, ((0, 0), (0, MEL_STEP_SIZE - mel.shape[1])), mode="edge")
    starts = np.minimum((np.arange(n) * MEL_FRAMES_PER_SECOND / fps).astype(np.int64),
                        mel.shape[1] - MEL_STEP_SIZE)
    idx = starts[:, None] + np.arange(MEL_STEP_SIZE)[None, :]
    return np.ascontiguousarray(mel[:, idx].transpose(1, 0, 2), dtype=np.float32)
