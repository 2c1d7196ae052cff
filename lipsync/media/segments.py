"""H.264 encoding on every core: the video cut into segments encoded at once, joined without re-encoding.

One x264 stream uses many cores only through frame threads, which wait on one another
(each frame's motion search needs the rows above it in the frame before). Here the frames are
cut into segments, each starting with a keyframe and encoded by its own ffmpeg (up to
``workers`` at once) into MPEG-TS, whose packets carry their own timestamps (the segment's
start is its offset); the segments' bytes are piped in time order as one stream into the join's
ffmpeg and copied into the MP4 with the speech (``-c copy``): one valid MP4, no frame added
or dropped at a join (tests/test_segments.py decodes every frame). The MP4 concat demuxer did
the same join at 15 ms a segment (it probes each file: 0.32 s for 40 s at 1084x1246 on the
H200's Xeon), the TS join takes one probe. The speech is encoded to AAC by one more ffmpeg from
the first piece on, so the join only copies. Once the speech has ended (``end_audio``: the service
calls it after the last piece, the writer's exit at the latest) and its AAC is written, the join's
ffmpeg is started, waiting for the segments on its stdin: after the last frame only the segments'
bytes are piped to it, not a process started (its exec and set-up: 10-15 ms of CPU on this 2-core
VM, on the critical path of every request).

How the frames are cut: ``frame_order(count)`` plans the next ``count`` frames. Given at least
two keyframe intervals, it cuts them into as many equal segments as encode at once and asks for
the frames in turn, a few of each segment at a time, so every encoder works from the start and
all finish with the last frame (frames written in time order would leave the last segment's
encoder a whole segment of work after the last frame: 0.3 s of a 40 s request at 1084x1246).
Frames written without a plan (or a short plan) are cut in time order, a keyframe interval
each.

No live (fragmented) copy: the segments are finished out of order. A request that streams uses
``lipsync.media.video.Mp4Writer`` (``lipsync.service`` picks it).
"""

from __future__ import annotations

import math
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
from lipsync.media.ffmpeg import InputPipe, ffmpeg_exe, grow_pipe, log_stderr, stderr_tail, wait_exit
from lipsync.media.video import AUDIO_OPTIONS, FrameInput, h264_options

# The shortest segment: x264 gives a stream of 1 or 2 frames no B-frame delay, so its
# timestamps would not continue those of the segments before it. A shorter tail joins the
# segment before it (which then holds a keyframe interval and a few frames).
MIN_SEGMENT_FRAMES = 4


def interleaved(sizes: list[int]) -> np.ndarray:
    """The frames of consecutive segments of ``sizes`` taken in turn: segment 0's first frame,
    segment 1's first, ..., segment 0's second, ...; (sum(sizes),) int64 frame offsets."""
    starts = np.cumsum([0, *sizes[:-1]])
    rank = np.concatenate([np.arange(n) for n in sizes])  # each frame's place in its segment
    owner = np.repeat(np.arange(len(sizes)), sizes)
    by_turn = np.lexsort((owner, rank))
    return (starts[owner] + rank)[by_turn]


class _Segment:
    """The frames of one segment on their way into its own ffmpeg: frames ``start`` on, a
    keyframe every ``keyint``."""

    def __init__(self, index: int, start: int, path: str, keyint: int):
        self.index = index
        self.start = start
        self.path = path
        self.keyint = keyint
        self.frames: queue.Queue[np.ndarray | None] = queue.Queue()
        self.count = 0
        self.complete_at = 0  # in a plan, but its last segment: the count that completes it
        self.future: Future | None = None


class SegmentedMp4Writer(FrameInput):
    """``Mp4Writer``'s contract (``write``, ``write_i420``, ``write_audio``, ``frames``,
    ``audio_samples``, ``encode_seconds``, ``frame_order``; the MP4 at ``path`` only on a clean
    exit, nothing left on failure) without ``live_path``, the video encoded in segments by up to
    ``workers`` ffmpeg processes at once (``threads`` encoder threads each; ``encoder``,
    ``preset``, ``crf`` as ``lipsync.media.video.h264_options`` takes them).

    ``segment_frames``: frames per segment when frames come in time order (default: one
    keyframe interval, 2 s, as ``Mp4Writer``'s). ``queue_bytes``: frames that may wait for an
    encoder, all segments together; the caller blocks beyond it.
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
        self._workers = max(1, workers)
        self._keyint = max(1, round(2 * fps))
        self._segment_frames = int(segment_frames or self._keyint)
        self._frame_bytes = width * height * 3 // 2
        self._budget = threading.Semaphore(max(1, queue_bytes // self._frame_bytes))
        self._error: str | None = None
        self._stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._procs_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._current: _Segment | None = None  # the segment the next frame in time order continues
        self._held: list[np.ndarray] = []  # frames past a full segment, not yet a segment of their own
        self._route: list[_Segment] = []  # a plan's segment of each frame still to come, in write order
        self._routed = 0
        self._work = tempfile.mkdtemp(prefix=".encode-", dir=os.path.dirname(os.path.abspath(path)))
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="mp4-segment")
        self._audio_path = os.path.join(self._work, "audio.m4a")
        self._joined_path = os.path.join(self._work, "final.mp4")
        self._audio = InputPipe("mp4-audio")
        self._joiner: threading.Thread | None = None  # starts the join once the speech is encoded
        self._join: subprocess.Popen | None = None
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

    def frame_order(self, count: int) -> np.ndarray:
        """The order to write the next ``count`` frames in: (count,) offsets from the next frame.
        At least two keyframe intervals are cut into ``min(workers, count // interval)`` equal
        segments taken in turn (``interleaved``); fewer come in time order. The caller writes
        exactly these frames in this order before the next ``frame_order`` or the end."""
        self._check_plan_done()
        segments = min(self._workers, count // self._keyint)
        if segments < 2:
            return np.arange(count)
        base, extra = divmod(count, segments)
        sizes = [base + (k < extra) for k in range(segments)]
        # Time order's leftovers end here: frames held past a full segment join it, and a
        # segment shorter than a keyframe interval goes on as the plan's first.
        first = None
        if self._current is not None:
            self._current.count += self._put_held(self._current)
            if self._current.count < self._keyint:
                first = self._current
            else:
                self._current.frames.put(None)
        start = self.frames
        planned = []
        for k, size in enumerate(sizes):
            if k == 0 and first is not None:
                planned.append(first)
            else:
                # Keyframes at equal steps of at most 1.5 intervals (a 2.6 s segment has one).
                keyint = math.ceil(size / max(1, round(size / self._keyint)))
                planned.append(self._new_segment(start, keyint))
            start += size
            planned[-1].complete_at = planned[-1].count + size
        planned[-1].complete_at = 0
        self._current = planned[-1]  # the last one: time order (or a short plan) may go on with it
        owner = np.repeat(np.arange(segments), sizes)
        order = interleaved(sizes)
        self._route = [planned[k] for k in owner[order]]
        self._routed = 0
        return order

    def _check_plan_done(self) -> None:
        if self._routed < len(self._route):
            raise ValueError(f"{len(self._route) - self._routed} frames of the last frame_order were not written")
        self._route, self._routed = [], 0

    def _put_audio(self, pcm: bytes) -> None:
        self._audio.put(pcm)

    def _end_audio(self) -> None:
        self._audio.end()
        self._joiner = threading.Thread(target=self._start_join, name="mp4-join", daemon=True)
        self._joiner.start()

    def _start_join(self) -> None:
        """Wait for the speech's AAC, then start the join's ffmpeg: it reads the segments' MPEG-TS
        on its stdin (``_finish`` pipes them) and copies them with the speech into the MP4 (the
        joiner thread)."""
        try:
            code = wait_exit(self._audio_proc, self.timeout)
        except subprocess.TimeoutExpired:
            self._error = self._error or self._too_slow()
            return
        if self._stopping.is_set():
            return  # aborted: _abort killed the speech encoder
        if code != 0:
            self._fail(self._audio_proc, "ffmpeg failed to encode the speech")
            return
        try:
            # Probing the stream no further than its first packet (the codec's parameters are in
            # it): 40-50 ms less for 40 s at 1084x1246.
            self._join = self._start([
                "-probesize", "32", "-analyzeduration", "0", "-f", "mpegts", "-i", "pipe:0",
                "-i", os.path.basename(self._audio_path), "-map", "0:v:0", "-map", "1:a:0", "-c", "copy",
                # TS packets carry no duration: each frame's (the last one's too) in 1/90 kHz
                "-bsf:v", f"setts=pts=PTS:dts=DTS:duration={round(90000 / self.fps)}",
                "-movflags", "+faststart", "-f", "mp4", os.path.basename(self._joined_path)], cwd=self._work)
            grow_pipe(self._join.stdin)
        except MediaError as exc:  # no ffmpeg to start
            self._error = self._error or exc.message

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
        if self._routed < len(self._route):  # a planned frame: its segment is known
            segment = self._route[self._routed]
            self._routed += 1
            segment.frames.put(data)
            segment.count += 1
            if segment.count == segment.complete_at:
                segment.frames.put(None)
        elif self._current is not None and self._current.count >= self._segment_frames:
            # Time order, a full segment: the next one starts once it has MIN_SEGMENT_FRAMES
            # frames, else (at the end) they join this one.
            self._held.append(data)
            if len(self._held) == MIN_SEGMENT_FRAMES:
                self._current.frames.put(None)
                self._current = self._new_segment(self.frames + 1 - len(self._held), self._keyint)
                self._current.count = self._put_held(self._current)
        else:
            if self._current is None:
                self._current = self._new_segment(self.frames, self._keyint)
            self._current.frames.put(data)
            self._current.count += 1
        self.frames += 1
        self.encode_seconds += time.perf_counter() - start

    def _new_segment(self, start: int, keyint: int) -> _Segment:
        """A segment from frame ``start`` on, its ffmpeg started as soon as a pool thread is free."""
        index = len(self._segments)
        segment = _Segment(index, start, os.path.join(self._work, f"video{index:05d}.ts"), keyint)
        segment.future = self._pool.submit(self._encode, segment)
        self._segments.append(segment)
        return segment

    def _put_held(self, segment: _Segment) -> int:
        """Queue the held frames on ``segment``; returns how many."""
        held = len(self._held)
        for data in self._held:
            segment.frames.put(data)
        self._held.clear()
        return held

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
                                             segment.keyint),
                                # Its place in the video: the join reads these timestamps. (One second
                                # later for all: x264's B-frames start before 0, and a muxer would
                                # move a segment that does.)
                                "-output_ts_offset", f"{1 + float(segment.start / self.fps):.6f}",
                                "-f", "mpegts", segment.path])
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
        self._check_plan_done()
        self.end_audio()  # the speech is complete: the join starts while the last frames encode
        if self._current is not None:
            self._put_held(self._current)
            self._current.frames.put(None)
        deadline = time.monotonic() + self.timeout
        self._joiner.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._joiner.is_alive():
            self._raise(self._too_slow())
        self._check()
        if not self._segments:
            self._raise("no video frames were written")
        # The segments' bytes in time order as one MPEG-TS stream, each as soon as it is encoded.
        join = self._join
        for segment in self._segments:
            try:
                segment.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._raise(self._too_slow())
            self._check()
            with open(segment.path, "rb") as ts:
                data = ts.read()
            try:
                join.stdin.write(data)
            except OSError:  # the join went away (BrokenPipeError): its exit status and stderr say why
                break
        try:
            join.stdin.close()
        except OSError:
            pass
        try:
            code = wait_exit(join, max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._raise(self._too_slow())
        if code != 0:
            self._fail(join, "ffmpeg failed to join the video")
            self._check()
        self._pool.shutdown()
        os.replace(self._joined_path, self.path)

    # -- processes and failures ------------------------------------------------------

    def _start(self, args: list[str], stdin=subprocess.PIPE, pass_fds: tuple[int, ...] = (),
               cwd: str | None = None) -> subprocess.Popen:
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
        log = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=log, pass_fds=pass_fds,
                                    cwd=cwd)
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

    def _too_slow(self) -> str:
        return f"ffmpeg did not finish within {self.timeout:.0f} s"

    def _abort(self) -> None:
        """Kill every ffmpeg, let the pool threads drain and end, remove the working folder."""
        self._stopping.set()
        if self._audio_proc.poll() is None:
            self._audio_proc.kill()
        if self._joiner is not None:  # it sees the speech encoder's exit and _stopping: no join after this
            self._joiner.join()
        with self._procs_lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        if self._join is not None:
            try:
                self._join.stdin.close()
            except OSError:
                pass
        for segment in self._segments:
            segment.frames.put(None)
        self._audio.end()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._audio.wait()
        for proc in [*procs, self._audio_proc]:
            proc.wait()
            proc.log.close()
        shutil.rmtree(self._work, ignore_errors=True)
