"""What every TTS provider returns, and the interface they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lipsync.errors import InvalidInputError

LANGUAGES = ("ru", "kk", "en")
DEFAULT_LANGUAGE = "ru"  # an omitted `language` (the seed's clients always sent one)


def validate_request(text: str, language: str) -> tuple[str, str]:
    """Check a synthesis request; returns (text, language) cleaned up.

    Raises ``InvalidInputError`` with code ``empty_text`` or
    ``unsupported_language``. Shared by every provider.
    """
    lang = language.strip().lower() if isinstance(language, str) else ""
    if lang not in LANGUAGES:
        raise InvalidInputError(f"unsupported language {language!r}: use one of {', '.join(LANGUAGES)}",
                                code="unsupported_language")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("the text is empty", code="empty_text")
    return text, lang


@dataclass(frozen=True)
class PhonemeEvent:
    """One phoneme of synthesised speech.

    ``start``/``end`` are seconds from the start of ``Speech.samples``;
    ``phoneme`` is the espeak-ng phoneme mnemonic (e.g. ``"a"``, ``"m"``,
    ``"_:"`` for a pause).
    """

    start: float
    end: float
    phoneme: str


@dataclass(frozen=True)
class Speech:
    """Mono speech at ``sample_rate`` Hz.

    ``samples``: float32 array of shape (n,), values in [-1, 1].
    ``phonemes``: the timeline reported by the synthesiser, empty when unknown
    (uploaded recordings, remote TTS).
    """

    samples: np.ndarray
    sample_rate: int = 16000
    phonemes: tuple[PhonemeEvent, ...] = field(default_factory=tuple)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / float(self.sample_rate)


class TTSProvider(Protocol):
    """A speech synthesiser. Implementations must be safe to call from many threads."""

    name: str

    def synthesize(self, text: str, language: str) -> Speech:
        """Speak ``text`` in ``language`` (one of ``LANGUAGES``) at 16 kHz mono.

        Raises ``lipsync.errors.TTSError`` (or ``TTSTimeoutError``) on failure.
        """
        ...
