"""Video avatars' base frames: read in a loop from their stored MP4, edited in yuv420p.

A video avatar's footage is stored once, at output size, as its ping-pong cycle (frames
0 .. N-1 then N-2 .. 1, ``lipsync.avatars.video``), so playing the file in a loop never
jumps. ``LoopedFrames`` decodes it with one ffmpeg (in its own process, so decoding
runs beside the render) into raw I420 frames, the encoder's own input format: a frame
nobody speaks on goes to the encoder as decoded, with no colour conversion at all.

I420 layout of an (H, W) frame, as one (H * 3 // 2, W) uint8 array: H rows of Y, then
H/4 rows holding the (H/2, W/2) U plane, then as many holding V.
"""

from __future__ import annotations

import queue
import subprocess
import tempfile
import threading

import cv2
import numpy as np

from lipsync.errors import MediaError
from lipsync.faces.box import Rect
from lipsync.media.ffmpeg import ffmpeg_exe, stderr_tail

READ_AHEAD = 8  # decoded frames waiting for the renderer


class LoopedFrames:
    """The frames of ``path`` (an MP4 of ``width`` x ``height``, both even) from its first,
    forever in a loop: ``read()`` returns the next one as (H * 3 // 2, W) uint8 I420."""

    def __init__(self, path: str, width: int, height: int, *, timeout: float = 60.0):
        self.shape = (height * 3 // 2, width)
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-stream_loop", "-1",
               "-i", path, "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "yuv420p", "pipe:1"]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=self._stderr, bufsize=0)
        except OSError as exc:
            self._stderr.close()
            raise MediaError(f"cannot start ffmpeg ({cmd[0]}): {exc.strerror or exc}") from None
        self._frames: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="base-frames", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        size = self.shape[0] * self.shape[1]
        stdout = self._proc.stdout
        while not self._closed.is_set():
            frame = np.empty(self.shape, np.uint8)
            view, got = memoryview(frame).cast("B"), 0
            while got < size:
                n = stdout.readinto(view[got:])
                if not n:
                    self._put(None)  # ffmpeg ended: a broken file (a loop never ends by itself)
                    return
                got += n
            self._put(frame)

    def _put(self, item) -> None:
        while not self._closed.is_set():
            try:
                self._frames.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self) -> np.ndarray:
        """The next frame (a new array the caller may change). Raises ``MediaError`` when
        ffmpeg cannot decode the file."""
        try:
            frame = self._frames.get(timeout=self.timeout)
        except queue.Empty:
            frame = None
        if frame is None:
            self._proc.kill()
            self._proc.wait()
            self._stderr.seek(0)
            raise MediaError(f"cannot decode the avatar's video: {stderr_tail(self._stderr.read(), lines=6)}")
        return frame

    def close(self) -> None:
        self._closed.set()
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._thread.join(timeout=5)
        self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> LoopedFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def even_window(rect: Rect, width: int, height: int) -> Rect:
    """``rect`` grown to even corners (whole chroma samples) inside a ``width`` x ``height`` frame."""
    return Rect(rect.x1 - rect.x1 % 2, rect.y1 - rect.y1 % 2,
                min(width, rect.x2 + rect.x2 % 2), min(height, rect.y2 + rect.y2 % 2))


def planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y (H, W), U and V (H/2, W/2) planes of an I420 ``frame``."""
    rows, w = frame.shape
    h = rows * 2 // 3
    chroma = frame[h:].reshape(2, h // 2, w // 2)
    return frame[:h], chroma[0], chroma[1]


def window_planes(frame: np.ndarray, window: Rect) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of ``window`` (even corners) in the Y (h, w), U and V (h/2, w/2) planes of an I420 ``frame``."""
    y, u, v = planes(frame)
    cy1, cy2, cx1, cx2 = window.y1 // 2, window.y2 // 2, window.x1 // 2, window.x2 // 2
    return y[window.y1:window.y2, window.x1:window.x2], u[cy1:cy2, cx1:cx2], v[cy1:cy2, cx1:cx2]


def i420_to_bgr(frame: np.ndarray, window: Rect) -> np.ndarray:
    """(window.height, window.width, 3) uint8 BGR of ``window`` (even corners) of an I420 frame."""
    small = np.concatenate([plane.ravel() for plane in window_planes(frame, window)])
    return cv2.cvtColor(small.reshape(window.height * 3 // 2, window.width), cv2.COLOR_YUV2BGR_I420)


def blend_i420(frame: np.ndarray, window: Rect, bgr: np.ndarray, mask: np.ndarray, chroma_mask: np.ndarray) -> None:
    """Blend ``bgr`` (window-sized BGR) into ``window`` of the I420 ``frame``, in place:
    ``base + mask * (new - base)`` per plane, rounded. ``mask``: (h, w) float32 in [0, 1];
    ``chroma_mask``: the same at half size (``chroma_weights``)."""
    new = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV_I420)  # (h * 3 // 2, w)
    for base, fresh, weight in zip(window_planes(frame, window), planes(new), (mask, chroma_mask, chroma_mask)):
        old = base.astype(np.float32)
        np.copyto(base, old + weight * (fresh.astype(np.float32) - old) + 0.5, casting="unsafe")


def chroma_weights(mask: np.ndarray) -> np.ndarray:
    """A (h, w) blend mask averaged over 2x2 blocks: the weight of each chroma sample."""
    h, w = mask.shape
    return np.ascontiguousarray(mask.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)), dtype=np.float32)
