"""Long texts: spoken sentence by sentence, joined into one seamless MP4."""

from __future__ import annotations

import numpy as np
import pytest

from lipsync.service import LipsyncService, pad_to_frames
from lipsync.settings import Settings
from lipsync.tts.text import split_sentences
from tests.media import decoded_audio, decoded_frames, probe

SENTENCES = ["Добрый день!", "Я расскажу вам о нашей компании.", "Спасибо за внимание."]


def test_split_sentences_keeps_every_word_in_order():
    text = "Привет! Как дела?\nЯ в порядке... «Хорошо». Next line\nand another.\n\nDone " + "слово, " * 80
    pieces = split_sentences(text, max_chars=120)
    assert pieces[:4] == ["Привет!", "Как дела?", "Я в порядке...", "«Хорошо»."]
    assert all(0 < len(p) <= 120 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_pad_to_frames_gives_whole_frames():
    assert len(pad_to_frames(np.ones(1000, np.float32), 25)) == 1280            # 2 frames of 640 samples
    assert len(pad_to_frames(np.ones(1600, np.float32), 30)) == 1600            # 3 frames at 30 fps
    assert len(pad_to_frames(np.ones(1601, np.float32), 30)) == 3200
    padded = pad_to_frames(np.ones(700, np.float32), 25)
    assert padded[:700].min() == 1 and not padded[700:].any()


@pytest.mark.slow
def test_sentences_join_without_clicks_and_stay_in_sync(tmp_path):
    service = LipsyncService(Settings(engine="builtin", output_dir=str(tmp_path / "o"),
                                      cache_dir=str(tmp_path / "c"))).load()
    out = tmp_path / "long.mp4"
    result = service.generate(str(out), text=" ".join(SENTENCES), language="ru")
    info = probe(out)
    assert info["frames"] == result.frames
    # Each sentence is padded to whole frames, so the picture ends with the sound.
    assert abs(info["video_duration"] - result.duration) < 1e-6
    assert abs(info["audio_duration"] - result.duration) <= 0.04 + 0.03  # AAC priming/padding

    # Each sentence ends in silence before the next begins: no cut-off word, no click.
    assert len(result.segments) == len(SENTENCES)
    assert all(a[1] == b[0] for a, b in zip(result.segments, result.segments[1:]))
    track = decoded_audio(out)
    loud = np.sqrt(np.mean(track ** 2))
    for _, end in result.segments[:-1]:
        j = int(end * 16000)
        before = track[j - 800: j]  # the 50 ms before the junction (the decoder may lag a few ms)
        assert np.sqrt(np.mean(before ** 2)) < 0.02 * loud
    # Nowhere an isolated burst inside silence (what a click looks like), 10 ms blocks.
    rms = np.sqrt(np.mean(track[: len(track) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
    quiet = rms < 0.01 * loud
    spikes = [i for i in range(1, len(rms) - 1) if quiet[i - 1] and quiet[i + 1] and rms[i] > 0.1 * loud]
    assert spikes == []

    # No frame jumps: consecutive frames differ only a little (the mouth moves, nothing else).
    frames = list(decoded_frames(out))
    steps = [np.abs(a.astype(int) - b).mean() for a, b in zip(frames, frames[1:])]
    assert max(steps) < 2.0
