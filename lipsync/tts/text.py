"""Splitting long texts into pieces the TTS can speak one after another."""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (possibly repeated, possibly followed by closing
# quotes or brackets) followed by white space, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'»”)\]]*\s+|\n\s*\n")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")


def split_sentences(text: str, max_chars: int = 250) -> list[str]:
    """Split ``text`` into sentences of at most ``max_chars`` characters.

    Sentences longer than that are cut at clause punctuation, then at spaces
    (never inside a word unless a single word is longer than ``max_chars``).
    Empty pieces are dropped; joining the result with spaces gives back the
    words of ``text`` in order.
    """
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if sentence:
            pieces.extend(_cut(sentence, max_chars))
    return pieces


def complete_length(text: str) -> int:
    """How much of ``text`` (arriving in pieces) holds complete sentences: the index just after
    the last sentence end followed by white space (0 when none has ended yet)."""
    end = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
    return end


def _cut(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    out: list[str] = []
    current = ""
    for part in _CLAUSE_END.split(sentence):
        for word in part.split() if len(part) > max_chars else [part]:
            while len(word) > max_chars:  # one enormous "word": hard cut
                if current:
                    out.append(current)
                    current = ""
                out.append(word[:max_chars])
                word = word[max_chars:]
            candidate = f"{current} {word}".strip()
            if len(candidate) > max_chars:
                out.append(current)
                current = word
            else:
                current = candidate
    if current:
        out.append(current)
    return out
