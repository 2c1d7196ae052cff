"""Writes tests/data/mel_reference.npz: Wav2Lip's mel recipe, computed with librosa, on the fixture speech.

The fast mel test (tests/test_audio.py) compares ``lipsync.media.audio.melspectrogram`` with this
file, so it needs neither librosa nor numba (importing them costs many seconds); a slow-marked test
recomputes the reference with live librosa and checks the file against it, so it cannot rot.

Regenerate (only if the fixture or the recipe changes):

    .venv/bin/python -m tests.data.make_mel_reference
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().with_name("mel_reference.npz")
FIXTURE = "kennedy_speech_16k.wav"


def reference_mel(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's own recipe (its audio.py) on librosa with the reflect padding it was trained with."""
    import librosa
    from scipy import signal

    emphasised = signal.lfilter([1, -0.97], [1], wav)
    stft = librosa.stft(y=emphasised, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    mel_basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, mel_basis @ np.abs(stft))) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def samples_digest(wav: np.ndarray) -> str:
    """What the reference was computed from: the decoded float32 samples."""
    return hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes()).hexdigest()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lipsync.media import audio
    from tests.conftest import FIXTURES

    wav = audio.load_audio(str(FIXTURES / FIXTURE))
    mel = reference_mel(wav).astype(np.float32)
    np.savez_compressed(OUT, mel=mel, samples_sha256=np.array(samples_digest(wav)), fixture=np.array(FIXTURE))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): mel {mel.shape} of {FIXTURE}")


if __name__ == "__main__":
    main()
