"""Audio decoding and Wav2Lip's mel features on real speech."""

from __future__ import annotations

import numpy as np
import pytest

from lipsync.media import audio
from lipsync.errors import InvalidInputError
from lipsync.media.ffmpeg import run_ffmpeg


def _reference_mel(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's own recipe (its audio.py) on librosa with the reflect padding it was trained with."""
    librosa = pytest.importorskip("librosa")
    from scipy import signal

    emphasised = signal.lfilter([1, -0.97], [1], wav)
    stft = librosa.stft(y=emphasised, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    mel_basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, mel_basis @ np.abs(stft))) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def test_mel_of_real_speech_matches_the_reference_recipe(speech_wav_path):
    wav = audio.load_audio(str(speech_wav_path))
    assert wav.dtype == np.float32 and abs(len(wav) / 16000 - 7.0) < 0.02
    mel = audio.melspectrogram(wav)
    assert mel.shape == (80, 1 + len(wav) // 200) and mel.dtype == np.float32
    assert np.abs(mel - _reference_mel(wav)).max() < 1e-3
    # the recording starts with 1.5 s of silence: quiet columns there, loud ones in the speech
    assert mel[:, 10:110].mean() < mel[:, 130:].mean() - 1.0


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
