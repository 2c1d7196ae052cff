"""One ffmpeg encoding a live session: I420 frames and 16 kHz speech in, fragmented MP4 out.

Low latency over compression: x264 ``zerolatency`` (no B-frames, no look-ahead: each frame
leaves the encoder as soon as it went in), a keyframe every ``KEYFRAME_S`` (where a late
viewer can start), fragments of at most ``FRAGMENT_S`` flushed at once. Video and sound go
in together, frame by frame, so they stay in step however long the session lasts.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from fractions import Fraction

import cv2
import numpy as np

from lipsync.errors import MediaError
from lipsync.live.fmp4 import FragmentReader, Segment
from lipsync.media.ffmpeg import InputPipe, ffmpeg_exe, log_stderr, stderr_tail, wait_exit

KEYFRAME_S = 1.0    # a late viewer waits at most this long for a picture
FRAGMENT_S = 0.08   # two frames at 25 fps: the delay fragmenting adds


class LiveEncoder:
    """``write(frame_bgr, samples)`` one frame and its sound; ``segments()`` yields the stream's
    init segment, then fragments as ffmpeg finishes them. ``close()`` ends it."""

    def __init__(self, width: int, height: int, fps: int | Fraction, *, sample_rate: int = 16000,
                 preset: str = "veryfast", crf: int = 23, threads: int = 0):
        self.size = (width, height)
        self.sample_rate = sample_rate
        self._audio = InputPipe("live-audio")
        self._stderr = tempfile.TemporaryFile()
        gop = max(1, round(KEYFRAME_S * fps))
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
               "-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", self._audio.url,
               "-map", "0:v:0", "-map", "1:a:0",
               "-c:v", "libx264", "-preset", preset, "-tune", "zerolatency", "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-threads", str(threads), "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
               "-x264-params", "ipratio=1.0",
               "-c:a", "aac", "-b:a", "96k", "-ar", "44100",
               "-flags", "+global_header", "-max_interleave_delta", "0", "-flush_packets", "1",
               "-avoid_negative_ts", "disabled",  # no shift of the video by the AAC priming (23 ms)
               "-f", "mp4", "-movflags", "empty_moov+default_base_moof+frag_keyframe",
               "-frag_duration", str(int(FRAGMENT_S * 1e6)), "pipe:1"]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                          bufsize=0, pass_fds=self._audio.pass_fds)
        except OSError as exc:
            self._audio.discard()
            self._stderr.close()
            raise MediaError(f"cannot start ffmpeg ({cmd[0]}): {exc.strerror or exc}") from None
        self._audio.started()
        self.frames = 0

    def write(self, frame: np.ndarray, samples: np.ndarray) -> None:
        """One (H, W, 3) uint8 BGR frame and its (n,) float32 speech in [-1, 1]."""
        self._audio.put((np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())
        try:
            self._proc.stdin.write(memoryview(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)).cast("B"))
        except (BrokenPipeError, ValueError, OSError):
            self._fail("ffmpeg stopped while encoding the live session")
        self.frames += 1

    def segments(self) -> Iterator[Segment]:
        """The stream as it is made (ends when ffmpeg does)."""
        return iter(FragmentReader(self._proc.stdout))

    def _fail(self, what: str) -> None:
        self._proc.kill()
        self._proc.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read()
        log_stderr(what, self._proc.returncode, stderr)
        raise MediaError(f"{what}: {stderr_tail(stderr, lines=6)}")

    def close(self) -> None:
        """Finish: ffmpeg flushes the last fragment and exits (killed if it hangs)."""
        self._audio.end()
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            wait_exit(self._proc, 10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._audio.wait()
        self._stderr.close()
