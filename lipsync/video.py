"""Avatar images, compositing and H.264 encoding.

Frames travel as raw BGR bytes through a pipe into ffmpeg: nothing per frame
touches the disk. The output file appears under its final name only when
ffmpeg finished successfully, so a failed request never leaves a half-written
MP4 behind.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Iterable, Iterator

import cv2
import numpy as np

from lipsync.engines.base import PreparedAvatar
from lipsync.errors import InvalidInputError, MediaError
from lipsync.ffmpeg import ffmpeg_exe, stderr_tail

MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs before decoding them fully


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG/... bytes into (H, W, 3) uint8 BGR.

    Greyscale and alpha images are converted. Raises ``InvalidInputError``
    (code ``invalid_image``) for anything that is not a readable image or is
    larger than ``MAX_IMAGE_PIXELS``.
    """
    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        raise InvalidInputError("the image is empty", code="invalid_image")
    header_ok, width, height = _image_size(data)
    if header_ok and width * height > MAX_IMAGE_PIXELS:
        raise InvalidInputError(f"the image is {width}x{height} pixels; at most "
                                f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels are accepted", code="image_too_large")
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidInputError("the file is not a readable image", code="invalid_image")
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(1, int(image.max())))
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _image_size(data: bytes) -> tuple[bool, int, int]:
    """Width and height read from a PNG or JPEG header without decoding."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return True, int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                return True, int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False, 0, 0


def fit_to_height(image: np.ndarray, max_height: int) -> np.ndarray:
    """The image scaled down (never up) to at most ``max_height`` rows, with even sides.

    H.264 in yuv420p needs even width and height; the odd last row/column is
    cropped rather than stretched.
    """
    h, w = image.shape[:2]
    if h > max_height:
        scale = max_height / h
        image = cv2.resize(image, (max(2, round(w * scale)), max_height), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    return np.ascontiguousarray(image[: h - h % 2, : w - w % 2])


def composite(avatar: PreparedAvatar, patches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Paste engine patches into the avatar, one full frame per patch.

    ``patches``: batches (n, region.height, region.width, 3) uint8 BGR.
    Yields (H, W, 3) uint8 BGR frames. The same buffer is reused for every
    frame (only the region changes), so consume each before the next.
    """
    r = avatar.region
    frame = avatar.image.copy()
    base = avatar.image[r.y1:r.y2, r.x1:r.x2].astype(np.float32)
    mask = avatar.mask.astype(np.float32)
    for batch in patches:
        for patch in batch:
            blended = base + mask * (patch.astype(np.float32) - base)
            frame[r.y1:r.y2, r.x1:r.x2] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
            yield frame


class Mp4Writer:
    """Encode BGR frames plus a WAV file into an H.264/AAC MP4 through ffmpeg.

    Use as a context manager: ``write`` frames, and on a clean exit the file
    is finished and moved to ``path``; on an exception ffmpeg is killed and
    nothing is left at ``path``. ``encode_seconds`` accumulates the time spent
    waiting on the encoder.
    """

    def __init__(self, path: str, width: int, height: int, fps: int, audio_path: str, *,
                 preset: str = "veryfast", crf: int = 23, timeout: float = 300.0):
        self.path = path
        self.size = (width, height)
        self.timeout = timeout
        self.encode_seconds = 0.0
        self.frames = 0
        directory = os.path.dirname(os.path.abspath(path))
        self._partial = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.part.mp4")
        self._stderr = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
               "-i", audio_path,
               "-map", "0:v:0", "-map", "1:a:0",
               "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-c:a", "aac", "-b:a", "128k", "-ar", "44100",
               "-movflags", "+faststart", self._partial]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 BGR frame."""
        if frame.shape[1::-1] != self.size:
            raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, expected {self.size[0]}x{self.size[1]}")
        start = time.perf_counter()
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except BrokenPipeError:
            self._fail("ffmpeg stopped while encoding")
        self.encode_seconds += time.perf_counter() - start
        self.frames += 1

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            self._stderr.close()
            return
        start = time.perf_counter()
        try:
            self._proc.stdin.close()
            code = self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"ffmpeg did not finish within {self.timeout:.0f} s")
        self.encode_seconds += time.perf_counter() - start
        if code != 0:
            self._fail("ffmpeg failed to encode the video")
        os.replace(self._partial, self.path)
        self._stderr.close()

    def _fail(self, what: str) -> None:
        self._abort()
        self._stderr.seek(0)
        details = stderr_tail(self._stderr.read())
        self._stderr.close()
        raise MediaError(f"{what}: {details}")

    def _abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self._proc.wait()
        if os.path.exists(self._partial):
            os.remove(self._partial)
