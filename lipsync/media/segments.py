"""H.264 encoding on every core: the video cut into segments encoded at once, joined without re-encoding.

One x264 stream uses many cores only through frame threads, which wait on one another
(each frame's motion search needs the rows above it in the frame before). Here the frames are
cut into segments of ``segment_frames`` (one keyframe interval: each segment starts with a
keyframe), each segment is encoded by its own ffmpeg as soon as its first frame arrives, up to
``workers`` at once, and the segments are joined by ffmpeg's concat demuxer with the streams
copied (``-c copy``): one valid MP4, the keyframes where one encode would put them, no frame
added or dropped at a join (tests/test_segments.py decodes every frame). The speech is encoded to
AAC by one more ffmpeg from the first piece on, so the join only copies.

No live (fragmented) copy: the segments are finished out of order. A request that streams uses
``lipsync.media.video.Mp4Writer`` (``lipsync.service`` picks it).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction

import numpy as np

from lipsync.errors import MediaError
from lipsync.media.ffmpeg import InputPipe, ffmpeg_exe, grow_pipe, log_stderr, stderr_tail
from lipsync.media.video import AUDIO_OPTIONS, FrameInput, h264_options

# The shortest segment: x264 gives a stream of 1 or 2 frames no B-frame delay, so its
# timestamps would not continue those of the segments before it. A shorter tail joins the
# segment before it (which then holds a keyframe interval and a few frames).
MIN_SEGMENT_FRAMES = 4


class _Segment:
    """The frames of one segment on their way into its own ffmpeg."""

    def __init__(self, index: int, path: str):
        self.index = index
        self.path = path
        self.frames: queue.Queue[np.ndarray | None] = queue.Queue()
        self.count = 0
        self.future: Future | None = None


class SegmentedMp4Writer(FrameInput):
    """``Mp4Writer``'s contract (``write``, ``write_i420``, ``write_audio``, ``frames``,
    ``audio_samples``, ``encode_seconds``; the MP4 at ``path`` only on a clean exit, nothing left
    on failure) without ``live_path``, the video encoded in segments by up to ``workers`` ffmpeg
    processes at once (``threads`` encoder threads each; ``encoder``, ``preset``, ``crf`` as
    ``lipsync.media.video.h264_options`` takes them).

    ``segment_frames``: frames per segment (default: one keyframe interval, 2 s, as
    ``Mp4Writer``'s). ``queue_bytes``: frames that may wait for an encoder, all segments
    together; the caller blocks beyond it (with ``workers`` segments being encoded at once,
    up to ``workers * segment_frames`` frames are worth holding).
    """

    def __init__(self, path: str, width: int, height: int, fps: int | Fraction, *, sample_rate: int = 16000,
                 preset: str = "veryfast", crf: int = 23, timeout: float = 300.0, workers: int = 4,
                 threads: int = 1, segment_frames: int | None = None, queue_bytes: int = 1 << 30,
                 encoder: str = "x264"):
        if width % 2 or height % 2:
            raise ValueError("segmented encoding needs even sides (yuv420p)")
        super().__init__(path, width, height, fps, sample_rate, timeout)
        self.live_path = None
        self._encoder, self._preset, self._crf, self._threads = encoder, preset, crf, threads
        self._keyint = max(1, round(2 * fps))
        self._segment_frames = int(segment_frames or self._keyint)
        self._frame_bytes = width * height * 3 // 2
        self._budget = threading.Semaphore(max(1, queue_bytes // self._frame_bytes))
        self._error: str | None = None
        self._stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._procs_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._current: _Segment | None = None
        self._held: list[np.ndarray] = []  # frames past a full segment, not yet a segment of their own
        self._work = tempfile.mkdtemp(prefix=".encode-", dir=os.path.dirname(os.path.abspath(path)))
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mp4-segment")
        self._audio_path = os.path.join(self._work, "audio.m4a")
        self._audio = InputPipe("mp4-audio")
        try:
            self._audio_proc = self._start([
                "-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", self._audio.url, *AUDIO_OPTIONS,
                "-f", "mp4", self._audio_path], stdin=subprocess.DEVNULL, pass_fds=self._audio.pass_fds)
        except MediaError:
            self._audio.discard()
            self._pool.shutdown(wait=False)
            shutil.rmtree(self._work, ignore_errors=True)
            raise
        self._audio.started()

    def _put_audio(self, pcm: bytes) -> None:
        self._audio.put(pcm)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        start = time.perf_counter()
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise
        self.encode_seconds += time.perf_counter() - start
        shutil.rmtree(self._work, ignore_errors=True)

    # -- segments --------------------------------------------------------------------

    def _put(self, data: np.ndarray) -> None:
        start = time.perf_counter()
        while not self._budget.acquire(timeout=0.2):
            self._check()
            if time.perf_counter() - start > self.timeout:
                self._raise(f"ffmpeg took no frame for {self.timeout:.0f} s")
        self._check()
        if self._current is not None and self._current.count >= self._segment_frames:
            # A full segment: the next one starts once it has MIN_SEGMENT_FRAMES frames, else
            # (at the end) they join this one.
            self._held.append(data)
            if len(self._held) == MIN_SEGMENT_FRAMES:
                self._next_segment()
        else:
            if self._current is None:
                self._next_segment()
            self._current.frames.put(data)
            self._current.count += 1
        self.frames += 1
        self.encode_seconds += time.perf_counter() - start

    def _next_segment(self) -> None:
        """Close the current segment and start the next one with the held frames."""
        if self._current is not None:
            self._current.frames.put(None)
        index = len(self._segments)
        segment = _Segment(index, os.path.join(self._work, f"video{index:05d}.mp4"))
        segment.future = self._pool.submit(self._encode, segment)
        self._segments.append(segment)
        self._current = segment
        for data in self._held:
            segment.frames.put(data)
        segment.count = len(self._held)
        self._held.clear()

    def _encode(self, segment: _Segment) -> None:
        """One segment's ffmpeg, fed from its queue (a pool thread)."""
        proc = None
        try:
            if self._stopping.is_set():
                return
            w, h = self.size
            proc = self._start(["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{w}x{h}", "-r", str(self.fps),
                                "-i", "pipe:0",
                                *h264_options(self._encoder, self._preset, self._crf, self._threads,
                                             self._keyint),
                                "-f", "mp4", segment.path])
            stdin = proc.stdin
            grow_pipe(stdin)
            while (data := segment.frames.get()) is not None:
                self._budget.release()
                if self._stopping.is_set():
                    continue  # drain: the caller may be waiting on the budget
                stdin.write(memoryview(data).cast("B"))
            stdin.close()
            if proc.wait() != 0:
                self._fail(proc, "ffmpeg failed to encode the video")
        except MediaError as exc:  # no ffmpeg to start
            self._error = self._error or exc.message
        except (OSError, ValueError):  # ffmpeg went away (BrokenPipeError), or stdin closed by _abort
            if not self._stopping.is_set():
                self._fail(proc, "ffmpeg stopped while encoding")
        finally:
            if proc is not None:
                self._forget(proc)

    def _finish(self) -> None:
        if self._current is not None:
            for data in self._held:
                self._current.frames.put(data)
            self._current.frames.put(None)
        deadline = time.monotonic() + self.timeout
        for segment in self._segments:
            try:
                segment.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._raise(f"ffmpeg did not finish within {self.timeout:.0f} s")
        self._check()
        self._audio.end()
        self._audio.wait(timeout=max(0.0, deadline - time.monotonic()))
        try:
            code = self._audio_proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._raise(f"ffmpeg did not finish within {self.timeout:.0f} s")
        if code != 0:
            self._fail(self._audio_proc, "ffmpeg failed to encode the speech")
        self._check()
        if not self._segments:
            self._raise("no video frames were written")
        listing = os.path.join(self._work, "video.txt")
        with open(listing, "w") as f:
            f.write("ffconcat version 1.0\n")
            f.writelines(f"file '{os.path.basename(s.path)}'\n" for s in self._segments)
        joined = os.path.join(self._work, "final.mp4")
        join = self._start(["-f", "concat", "-safe", "0", "-i", listing, "-i", self._audio_path,
                            "-map", "0:v:0", "-map", "1:a:0", "-c", "copy", "-movflags", "+faststart",
                            "-f", "mp4", joined], stdin=subprocess.DEVNULL)
        try:
            code = join.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._raise(f"ffmpeg did not finish within {self.timeout:.0f} s")
        if code != 0:
            self._fail(join, "ffmpeg failed to join the video")
            self._check()
        self._pool.shutdown()
        os.replace(joined, self.path)

    # -- processes and failures ------------------------------------------------------

    def _start(self, args: list[str], stdin=subprocess.PIPE, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
        log = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=log, pass_fds=pass_fds)
        except OSError as exc:
            log.close()
            raise MediaError(f"cannot start ffmpeg ({cmd[0]}): {exc.strerror or exc}") from None
        proc.log = log  # its stderr, read by _fail
        with self._procs_lock:
            self._procs.add(proc)
        return proc

    def _forget(self, proc: subprocess.Popen) -> None:
        with self._procs_lock:
            self._procs.discard(proc)
        proc.log.close()

    def _fail(self, proc: subprocess.Popen | None, what: str) -> None:
        """Record the first failure (with ffmpeg's sanitised stderr); the caller's thread raises it."""
        details = "no error output"
        if proc is not None:
            proc.log.seek(0)
            text = proc.log.read()
            log_stderr(what, proc.poll(), text)
            details = stderr_tail(text, lines=12, paths=[self._work, self.path])
        if self._error is None:
            self._error = f"{what}: {details}"

    def _check(self) -> None:
        if self._error is not None:
            self._raise(self._error)

    def _raise(self, message: str) -> None:
        raise MediaError(message)

    def _abort(self) -> None:
        """Kill every ffmpeg, let the pool threads drain and end, remove the working folder."""
        self._stopping.set()
        with self._procs_lock:
            procs = list(self._procs)
        for proc in [*procs, self._audio_proc]:
            if proc.poll() is None:
                proc.kill()
        for segment in self._segments:
            segment.frames.put(None)
        self._audio.end()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._audio.wait()
        for proc in [*procs, self._audio_proc]:
            proc.wait()
            proc.log.close()
        shutil.rmtree(self._work, ignore_errors=True)
