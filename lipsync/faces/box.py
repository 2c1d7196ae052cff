"""Rectangles on the avatar image: ``Rect``, and ``FaceBox``, the face box every stage agrees on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

_R = TypeVar("_R", bound="Rect")


@dataclass(frozen=True)
class Rect:
    """A rectangle in pixels of an image, half-open: x2, y2 excluded."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def clip(self: _R, width: int, height: int) -> _R:
        """The rectangle limited to an image of ``width`` x ``height`` pixels (same type)."""
        return type(self)(max(0, self.x1), max(0, self.y1), min(width, self.x2), min(height, self.y2))

    def scaled(self: _R, factor: float) -> _R:
        """The same rectangle on an image resized by ``factor`` (same type, corners rounded)."""
        return type(self)(*(int(round(v * factor)) for v in (self.x1, self.y1, self.x2, self.y2)))

    def as_list(self) -> list[int]:
        """``[x1, y1, x2, y2]``."""
        return [self.x1, self.y1, self.x2, self.y2]


@dataclass(frozen=True)
class FaceBox(Rect):
    """A face rectangle in pixels of the avatar image, half-open: x2, y2 excluded.

    It uses S3FD's framing (roughly forehead to chin, ear to ear), which is
    what the published Wav2Lip models were trained on; other detectors map
    their boxes to it.
    """
