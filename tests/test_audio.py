"""Audio decoding and Wav2Lip's mel features on real speech."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from lipsync.errors import InvalidInputError
from lipsync.media import audio
from lipsync.media.ffmpeg import run_ffmpeg
from tests.conftest import skip_or_fail
from tests.data.make_mel_reference import FIXTURE, reference_mel, samples_digest
from tests.data.make_mel_reference import OUT as MEL_REFERENCE


def _stored_reference_mel(wav: np.ndarray) -> np.ndarray:
    """The reference recipe's mel of the fixture speech, computed once with librosa
    (tests/data/make_mel_reference.py): importing librosa and numba costs many seconds."""
    stored = np.load(MEL_REFERENCE)
    assert str(stored["samples_sha256"]) == samples_digest(wav), (
        f"{MEL_REFERENCE.name} was computed from other samples of {FIXTURE}: "
        "regenerate it with `.venv/bin/python -m tests.data.make_mel_reference`")
    return stored["mel"]


def _live_reference_mel(wav: np.ndarray) -> np.ndarray:
    """The same recipe on live librosa (slow to import)."""
    if importlib.util.find_spec("librosa") is None:
        skip_or_fail("librosa is not installed (requirements-dev.txt): the mel reference is not checked")
    return reference_mel(wav)


def _check_mel_of_real_speech(speech_wav_path, reference) -> None:
    wav = audio.load_audio(str(speech_wav_path))
    assert wav.dtype == np.float32 and abs(len(wav) / 16000 - 7.0) < 0.02
    mel = audio.melspectrogram(wav)
    assert mel.shape == (80, 1 + len(wav) // 200) and mel.dtype == np.float32
    assert np.abs(mel - reference(wav)).max() < 1e-3
    # the recording starts with 1.5 s of silence: quiet columns there, loud ones in the speech
    assert mel[:, 10:110].mean() < mel[:, 130:].mean() - 1.0


def test_mel_of_real_speech_matches_the_reference_recipe(speech_wav_path):
    _check_mel_of_real_speech(speech_wav_path, _stored_reference_mel)


@pytest.mark.slow
def test_mel_of_real_speech_matches_the_reference_recipe_on_live_librosa(speech_wav_path):
    _check_mel_of_real_speech(speech_wav_path, _live_reference_mel)
    # and the stored reference the fast test uses is still what librosa computes
    wav = audio.load_audio(str(speech_wav_path))
    assert np.abs(_stored_reference_mel(wav) - _live_reference_mel(wav)).max() < 1e-5


def test_mel_is_the_dense_filterbank_product_bit_for_bit(speech_wav_path):
    """The mel multiplies each filter over its own bins only (no BLAS): the same float32
    values as the whole (80, 401) filterbank times the spectrum, on real speech and on noise."""
    speech = audio.load_audio(str(speech_wav_path))
    noise = np.random.default_rng(5).standard_normal(3 * 16000 + 123).astype(np.float32) * 0.2
    for wav in (speech, noise):
        x = wav.astype(np.float64)
        emphasised = np.append(x[:1], x[1:] - audio.PREEMPHASIS * x[:-1])
        padded = np.pad(emphasised, audio.N_FFT // 2, mode="reflect")
        n = 1 + (padded.size - audio.N_FFT) // audio.HOP_LENGTH
        frames = np.stack([padded[i * audio.HOP_LENGTH:i * audio.HOP_LENGTH + audio.N_FFT] for i in range(n)])
        window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(audio.WIN_LENGTH) / audio.WIN_LENGTH)
        mel = audio.mel_filters() @ np.abs(np.fft.rfft(frames * window, axis=1)).T
        db = 20.0 * np.log10(np.maximum(1e-5, mel)) - audio.REF_LEVEL_DB
        m = audio.MAX_ABS_VALUE
        dense = np.clip(2 * m * ((db - audio.MIN_LEVEL_DB) / -audio.MIN_LEVEL_DB) - m, -m, m)
        assert np.array_equal(audio.melspectrogram(wav), dense[:, :1 + wav.size // audio.HOP_LENGTH].astype(np.float32))


def test_windows_follow_the_spec_indexing():
    mel = np.arange(80 * 100, dtype=np.float32).reshape(80, 100)
    windows = audio.mel_windows(mel, 25)
    # windows start inside the mel: i * 80 / 25 < 100  ->  32 windows
    assert windows.shape == (32, 80, 16)
    assert np.array_equal(windows[3], mel[:, 9:25])           # int(3 * 3.2) = 9
    assert np.array_equal(windows[-1], mel[:, -16:])          # runs past the end: last 16 columns
    assert audio.frame_count(99 * 200, 25) == 32


def test_windows_of_a_very_short_clip_still_exist():
    wav = np.zeros(1000, np.float32)
    mel = audio.melspectrogram(wav)
    windows = audio.mel_windows(mel, 25)
    assert len(windows) == audio.frame_count(len(wav), 25) == 2
    assert windows.shape[1:] == (80, 16)


@pytest.mark.parametrize("fmt,args", [("mp3", ["-c:a", "libmp3lame"]), ("ogg", ["-c:a", "libvorbis"]),
                                      ("m4a", ["-c:a", "aac"]), ("wav", [])])
def test_compressed_uploads_decode_to_16k_mono(tmp_path, speech_wav_path, fmt, args):
    out = tmp_path / f"speech.{fmt}"
    run_ffmpeg(["-i", str(speech_wav_path), "-ac", "2", "-ar", "44100", *args, str(out)])
    wav = audio.load_audio(out.read_bytes())
    assert abs(len(wav) / 16000 - 7.0) < 0.1
    assert np.sqrt(np.mean(wav[int(2.0 * 16000):] ** 2)) > 0.01


@pytest.mark.parametrize("data", [b"not audio at all", b"RIFF\x00\x00\x00\x00WAVEfmt ", bytes(range(256)) * 40])
def test_unreadable_audio_is_an_input_error(data):
    with pytest.raises(InvalidInputError) as err:
        audio.load_audio(data)
    assert err.value.code == "invalid_audio"
    assert "Traceback" not in err.value.message


def test_decoding_can_stop_past_a_limit(speech_wav_path):
    wav = audio.load_audio(str(speech_wav_path), max_seconds=2.0)
    assert len(wav) == 3 * 16000  # one second past the limit: enough to say "too long"
