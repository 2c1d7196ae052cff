"""The face box every stage agrees on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaceBox:
    """A face rectangle in pixels of the avatar image, half-open: x2, y2 excluded.

    It uses S3FD's framing (roughly forehead to chin, ear to ear), which is
    what the published Wav2Lip models were trained on; other detectors map
    their boxes to it.
    """

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

    def clip(self, width: int, height: int) -> "FaceBox":
        """The box limited to an image of ``width`` x ``height`` pixels."""
        return FaceBox(max(0, self.x1), max(0, self.y1), min(width, self.x2), min(height, self.y2))

    def scaled(self, factor: float) -> "FaceBox":
        """The same box on an image resized by ``factor``."""
        return FaceBox(*(int(round(v * factor)) for v in (self.x1, self.y1, self.x2, self.y2)))

    def as_list(self) -> list[int]:
        return [self.x1, self.y1, self.x2, self.y2]
