"""Avatar images, compositing and H.264 encoding.

Frames travel as raw BGR bytes through a pipe into ffmpeg: nothing per frame
touches the disk. The output file appears under its final name only when
ffmpeg finished successfully, so a failed request never leaves a half-written
MP4 behind.
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
from collections.abc import Iterable, Iterator
from fractions import Fraction

import cv2
import numpy as np

from lipsync.engines.base import PreparedAvatar
from lipsync.errors import InvalidInputError, MediaError
from lipsync.faces.box import Rect
from lipsync.media.ffmpeg import InputPipe, ffmpeg_exe, grow_pipe, has_encoder, log_stderr, stderr_tail, wait_exit
from lipsync.media.frames import even_window, planes, window_planes
from lipsync.media.images import read_header

MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs before decoding them fully


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, *, shrink_to: int = 0) -> np.ndarray:
    """Decode JPEG/PNG/... bytes into (H, W, 3) uint8 BGR, upright.

    The decoder writes 8-bit BGR directly: greyscale, alpha and 16-bit images are converted
    while decoding (alpha dropped, 16 bits cut to 8), never through a 16-bit or alpha copy of
    the image, and the EXIF orientation (JPEG, PNG) is applied, as viewers do: a portrait photo
    from a phone comes out portrait. With ``shrink_to`` > 0 the image is decoded at 1/2, 1/4
    or 1/8 of its size, the smallest that keeps its shorter side at least ``shrink_to`` pixels
    (a JPEG is scaled while decoding, in a fraction of the memory). Raises
    ``InvalidInputError`` (code ``invalid_image``) for anything that is not a readable image,
    and (code ``image_too_large``) for one over ``max_pixels``, read from its header before
    decoding (rotation does not change the count).

    Pillow reads the header (any format it knows); OpenCV decodes, about 1.4 times as fast
    as Pillow on a JPEG avatar and with the same pixels. What Pillow cannot size is refused
    undecoded: its pixel count is unknown, so it could be a bomb.
    """
    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        raise InvalidInputError("the image is empty", code="invalid_image")
    header = read_header(data)
    if header is None:
        raise InvalidInputError("the file is not a readable image", code="invalid_image")
    if header.width * header.height > max_pixels:
        width, height = header.width, header.height
        raise InvalidInputError(f"the image is {width}x{height} pixels; at most "
                                f"{max_pixels / 1e6:g} megapixels are accepted", code="image_too_large")
    image = cv2.imdecode(buf, _decode_flags(min(header.width, header.height), shrink_to))
    if image is None:
        raise InvalidInputError("the file is not a readable image", code="invalid_image")
    return image


def _decode_flags(shorter_side: int, shrink_to: int) -> int:
    """OpenCV's flags for ``decode_image``: 8-bit BGR with EXIF orientation, reduced by the
    largest of 8, 4, 2 that keeps ``shorter_side`` at least ``shrink_to`` (no reduction for 0)."""
    if shrink_to > 0:
        for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                             (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if shorter_side // factor >= shrink_to:
                return flag
    return cv2.IMREAD_COLOR


def fit_to_height(image: np.ndarray, max_height: int, max_pixels: int = 0) -> np.ndarray:
    """The image scaled down (never up) to at most ``max_height`` rows and, when given,
    ``max_pixels`` pixels, with even sides.

    H.264 in yuv420p needs even width and height; the odd last row/column is
    cropped rather than stretched.
    """
    h, w = image.shape[:2]
    height = min(h, max_height)
    if max_pixels and height * height * w > max_pixels * h:  # the width follows the height
        height = max(2, math.isqrt(max_pixels * h // w))
    if height < h:
        scale = height / h
        image = cv2.resize(image, (max(2, round(w * scale)), height), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    return np.ascontiguousarray(image[: h - h % 2, : w - w % 2])


# The longest fragment of a streamed request's live copy: a player can start once the first
# one is written, so this bounds what fragmenting adds to the first frame's delay.
LIVE_FRAGMENT_S = 0.2

# The speech's codec in every MP4 made here. All speech is 16 kHz mono by the time it is encoded,
# so AAC at 16 kHz keeps all of it; ffmpeg's "fast" coder at 64 kbps is closer to the speech
# (SNR 33 dB) than its default coder at 44.1 kHz and 128 kbps (29 dB) for a quarter of the CPU
# (0.28 s instead of 1.3 s for 40 s of speech): that encoder, one thread, finished long requests
# last (docs/PERFORMANCE.md "Issue 14, third round").
AUDIO_OPTIONS = ("-c:a", "aac", "-aac_coder", "fast", "-b:a", "64k", "-ar", "16000")


# H.264 encoders ffmpeg may have (``VIDEO_ENCODER``), by this project's names: ffmpeg's encoder.
H264_ENCODERS = {"x264": "libx264", "openh264": "libopenh264"}


def resolve_encoder(name: str) -> str:
    """The H.264 encoder to use for ``name`` (a ``VIDEO_ENCODER`` setting): ``auto`` is
    ``openh264`` where this ffmpeg has it (the pip-bundled one does; 2.3-2.6x less CPU a frame
    than x264 ``veryfast`` at the same SSIM, docs/PERFORMANCE.md "Issue 14"), else ``x264``. Raises
    ``MediaError`` for an encoder this ffmpeg lacks."""
    if name == "auto":
        return "openh264" if has_encoder(H264_ENCODERS["openh264"]) else "x264"
    if name not in H264_ENCODERS:
        raise MediaError(f"unknown H.264 encoder {name!r} (choose from auto, {', '.join(H264_ENCODERS)})")
    if not has_encoder(H264_ENCODERS[name]):
        raise MediaError(f"VIDEO_ENCODER={name}, but the ffmpeg at {ffmpeg_exe()} was built without "
                         f"{H264_ENCODERS[name]}: use another ffmpeg (FFMPEG_BINARY) or VIDEO_ENCODER=auto")
    return name


def h264_options(encoder: str, preset: str, crf: int, threads: int, keyint: int,
                 tune: str | None = None) -> list[str]:
    """ffmpeg's output options for the video: yuv420p H.264 with a keyframe every ``keyint``
    frames. ``encoder`` ``x264``: ``preset``/``crf``/``threads``/``tune`` as x264 takes them
    (keyframes also at scene cuts); ``openh264``: ``crf`` is its fixed quantiser (QP; the
    same number gives the SSIM x264 ``veryfast`` gives at that CRF on avatar footage), Main
    profile with CABAC, ``threads``; no preset, no tune, no B-frames."""
    if encoder == "openh264":
        # One QP for every frame: keyframes at the quality of the frames between them (see x264's ipratio).
        return ["-c:v", "libopenh264", "-profile:v", "main", "-coder", "cabac", "-rc_mode", "quality",
                "-qmin", str(crf), "-qmax", str(crf), "-pix_fmt", "yuv420p", "-threads", str(threads),
                "-g", str(keyint)]
    if encoder != "x264":
        raise ValueError(f"unknown H.264 encoder {encoder!r}")
    return ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-threads", str(threads), *(["-tune", tune] if tune else []), "-g", str(keyint),
            # Keyframes at the quality of the frames between them: otherwise the
            # still avatar visibly "pulses" at every keyframe.
            "-x264-params", "ipratio=1.0"]


def composite(avatar: PreparedAvatar, patches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Paste engine patches into the avatar, one full frame per patch.

    ``patches``: batches (n, region.height, region.width, 3) uint8 BGR.
    Yields (H, W, 3) uint8 BGR frames. The same buffer is reused for every
    frame (only the region changes), so consume each before the next.

    Only the mask's bounding box is blended (outside it the frame is the
    avatar whatever the patch holds): ``round(base + mask * (patch - base))``
    computed as ``patch * mask + (base * (1 - mask) + 0.5)``, truncated, with
    the per-avatar term precomputed.
    """
    r = avatar.region
    frame = avatar.image.copy()
    box = _mask_box(avatar.mask)
    if box is None:  # nothing shows through: every frame is the avatar
        for batch in patches:
            for _ in batch:
                yield frame
        return
    y1, y2, x1, x2 = box
    # One weight per channel: numpy's broadcast of an (h, w, 1) mask over 3 channels runs 4x
    # slower than same-shape arrays, for the same products.
    mask = np.ascontiguousarray(np.broadcast_to(avatar.mask[y1:y2, x1:x2], (y2 - y1, x2 - x1, 3)), dtype=np.float32)
    base = avatar.image[r.y1 + y1:r.y1 + y2, r.x1 + x1:r.x1 + x2].astype(np.float32)
    keep = base * (1.0 - mask) + 0.5
    target = frame[r.y1 + y1:r.y1 + y2, r.x1 + x1:r.x1 + x2]
    work = np.empty(base.shape, np.float32)
    for batch in patches:
        for patch in batch:
            np.multiply(patch[y1:y2, x1:x2], mask, out=work)
            work += keep
            np.clip(work, 0, 255, out=work)
            np.copyto(target, work, casting="unsafe")  # float -> uint8 truncates: with the +0.5, rounds
            yield frame


def composite_i420(avatar: PreparedAvatar, patches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """``composite``'s frames as I420, (H * 3 // 2, W) uint8, a new array per frame (a writer's
    ``write_i420`` keeps it): the same bytes as ``cv2.cvtColor(frame, COLOR_BGR2YUV_I420)``.

    Only the blended box (grown to even corners: whole chroma samples) is converted per frame,
    into a copy of the avatar's own planes: the conversion is local to each 2x2 block, and
    outside the box every frame is the avatar. ``avatar.image`` must have even sides.
    """
    height, width = avatar.image.shape[:2]
    base = cv2.cvtColor(avatar.image, cv2.COLOR_BGR2YUV_I420)
    box = _mask_box(avatar.mask)
    if box is None:
        for batch in patches:
            for _ in batch:
                yield base.copy()
        return
    r = avatar.region
    window = even_window(Rect(r.x1 + box[2], r.y1 + box[0], r.x1 + box[3], r.y1 + box[1]), width, height)
    for frame in composite(avatar, patches):
        small = cv2.cvtColor(np.ascontiguousarray(frame[window.y1:window.y2, window.x1:window.x2]),
                             cv2.COLOR_BGR2YUV_I420)
        out = base.copy()
        for plane, converted in zip(window_planes(out, window), planes(small)):
            plane[...] = converted
        yield out


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y1, y2, x1, x2) of the pixels where ``mask`` (h, w, 1) is not 0; None when it is 0 everywhere."""
    m = mask.reshape(mask.shape[0], mask.shape[1], -1).max(axis=2) > 0
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


class FrameInput:
    """What the MP4 writers take: ``write_audio``, ``end_audio``, ``write`` (BGR), ``write_i420``,
    counted in ``frames``/``audio_samples``; the writer gives ``size``, ``_yuv``, ``_put``,
    ``_put_audio`` and ``_end_audio``."""

    _yuv = True

    def __init__(self, path: str, width: int, height: int, fps: int | Fraction, sample_rate: int, timeout: float):
        self.path = path
        self.size = (width, height)
        self.fps = fps
        self.sample_rate = sample_rate
        self.timeout = timeout
        self.encode_seconds = 0.0
        self.frames = 0
        self.audio_samples = 0
        self.audio_ended = False

    def frame_order(self, count: int) -> np.ndarray:
        """The order to write the next ``count`` frames in: (count,) offsets from the next frame.
        Time order here; a writer that encodes segments at once may want them interleaved
        (``lipsync.media.segments``)."""
        return np.arange(count)

    def write_audio(self, samples: np.ndarray) -> None:
        """Append speech: (n,) float32 in [-1, 1] at ``sample_rate``. Never blocks."""
        if self.audio_ended:
            raise ValueError("the speech was ended (end_audio) before more was written")
        self.audio_samples += len(samples)
        self._put_audio((np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())

    def end_audio(self) -> None:
        """No more speech will come (the writer's exit implies it): a writer may finish the sound
        while frames are still being written. Never blocks; again is a no-op."""
        if not self.audio_ended:
            self.audio_ended = True
            self._end_audio()

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 BGR frame (copied: the caller may reuse its buffer at once)."""
        if frame.shape[1::-1] != self.size:
            raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, expected {self.size[0]}x{self.size[1]}")
        start = time.perf_counter()
        data = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420) if self._yuv else np.array(frame, np.uint8, order="C")
        self.encode_seconds += time.perf_counter() - start
        self._put(data)

    def write_i420(self, frame: np.ndarray) -> None:
        """Append one frame already in I420, (H * 3 // 2, W) uint8 (``lipsync.media.frames``);
        the writer keeps it: the caller must not change it afterwards."""
        if not self._yuv or frame.shape != (self.size[1] * 3 // 2, self.size[0]):
            raise ValueError(f"an I420 frame of {self.size[0]}x{self.size[1]} is {self.size[1] * 3 // 2}x"
                             f"{self.size[0]} bytes, got {frame.shape}")
        self._put(frame)

    def __enter__(self):
        return self

    def _put(self, data: np.ndarray) -> None:  # pragma: no cover - each writer has its own
        raise NotImplementedError

    def _put_audio(self, pcm: bytes) -> None:  # pragma: no cover - each writer has its own
        raise NotImplementedError

    def _end_audio(self) -> None:  # pragma: no cover - each writer has its own
        raise NotImplementedError


class Mp4Writer(FrameInput):
    """Encode BGR frames and mono speech into an H.264/AAC MP4 with one ffmpeg.

    Frames are converted to yuv420p here (OpenCV, BT.601 limited range, as
    ffmpeg's own conversion; half the bytes of BGR and no single-threaded
    conversion inside ffmpeg) and handed to a feeder thread that writes them
    into ffmpeg's stdin, so the caller goes on rendering while the encoder
    catches up (at most ``queue_bytes`` of frames wait). Speech goes through
    a second pipe (``InputPipe``) fed by another thread, so it can arrive piece by piece (sentence by
    sentence) while the frames of earlier pieces are already being encoded.
    The MP4 (with ``+faststart``) appears at ``path`` only on a clean exit;
    when ``live_path`` is given, a fragmented copy grows there while encoding
    (playable before it is complete, for streaming). On an exception ffmpeg
    is killed and no file is left behind.

    ``fps``: frames per second, whole or a ``Fraction`` (NTSC's 30000/1001 for a video
    avatar filmed at 29.97 fps). ``encode_seconds`` accumulates the time spent converting frames, waiting
    on the encoder, and finishing the file. ``encoder``: ``x264`` or ``openh264``
    (``h264_options``: ``preset`` and ``tune`` are x264's); ``threads``: encoder threads (0:
    ffmpeg's choice, about 1.5 per core for x264); ``tune``: an x264 tune (e.g.
    ``zerolatency``) or None; ``queue_bytes``: frames that may wait for the
    encoder.
    """

    def __init__(self, path: str, width: int, height: int, fps: int | Fraction, *, sample_rate: int = 16000,
                 preset: str = "veryfast", crf: int = 23, timeout: float = 300.0, live_path: str | None = None,
                 queue_bytes: int = 64 << 20, threads: int = 0, tune: str | None = None, encoder: str = "x264"):
        super().__init__(path, width, height, fps, sample_rate, timeout)
        self._yuv = width % 2 == 0 and height % 2 == 0  # yuv420p needs even sides; odd ones go as BGR
        self._work = tempfile.mkdtemp(prefix=".encode-", dir=os.path.dirname(os.path.abspath(path)))
        self.live_path = live_path
        self._partial = os.path.join(self._work, "final.mp4")
        self._audio = InputPipe("mp4-audio")
        self._stderr = tempfile.TemporaryFile()
        final = f"[f=mp4:movflags=+faststart]{_tee_escape(self._partial)}"
        # The live copy is the same encoded stream in fragments, written while
        # encoding (the tee muxer: one encode, two files). A fragment ends at a keyframe or
        # after LIVE_FRAGMENT_S, whichever comes first: a player starts after the first one.
        live = (f"|[f=mp4:movflags=frag_keyframe+empty_moov+default_base_moof:flush_packets=1:"
                f"frag_duration={int(LIVE_FRAGMENT_S * 1e6)}]{_tee_escape(live_path)}") if live_path else ""
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "yuv420p" if self._yuv else "bgr24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "pipe:0",
               "-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", self._audio.url,
               "-map", "0:v:0", "-map", "1:a:0",
               # a keyframe every 2 s (segments and a live copy's fragments start at one)
               *h264_options(encoder, preset, crf, threads, max(1, round(2 * fps)), tune),
               *AUDIO_OPTIONS,
               "-flags", "+global_header",  # fragmented MP4 needs SPS/PPS in its header up front
               "-f", "tee", final + live]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr, pass_fds=self._audio.pass_fds)
        except OSError as exc:  # no ffmpeg where FFMPEG_BINARY points: leave nothing behind
            self._audio.discard()
            self._cleanup()
            raise MediaError(f"cannot start ffmpeg ({cmd[0]}): {exc.strerror or exc}") from None
        self._audio.started()
        grow_pipe(self._proc.stdin)
        frame_bytes = width * height * 3 // (2 if self._yuv else 1)
        self._frames: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=max(4, queue_bytes // frame_bytes))
        self._video_error: BaseException | None = None
        self._video_thread = threading.Thread(target=self._feed_video, name="mp4-video", daemon=True)
        self._video_thread.start()

    def _put_audio(self, pcm: bytes) -> None:
        self._audio.put(pcm)

    def _end_audio(self) -> None:
        self._audio.end()

    def _put(self, data: np.ndarray) -> None:
        start = time.perf_counter()
        if self._video_error is not None:
            self._fail("ffmpeg stopped while encoding")
        while True:
            try:
                self._frames.put(data, timeout=0.2)
                break
            except queue.Full:
                if self._video_error is not None or self._proc.poll() is not None:
                    self._fail("ffmpeg stopped while encoding")
                if time.perf_counter() - start > self.timeout:  # alive but stuck: never hang a request
                    self._fail(f"ffmpeg took no frame for {self.timeout:.0f} s")
        self.encode_seconds += time.perf_counter() - start
        self.frames += 1

    def _feed_video(self) -> None:
        try:
            while (data := self._frames.get()) is not None:
                self._proc.stdin.write(memoryview(data).cast("B"))
        except (OSError, ValueError) as exc:  # BrokenPipeError: ffmpeg went away; ValueError: stdin closed
            self._video_error = exc

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        start = time.perf_counter()
        self.end_audio()
        deadline = time.monotonic() + self.timeout
        while self._video_thread.is_alive():
            try:
                self._frames.put(None, timeout=0.2)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self._video_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._video_thread.is_alive():
            self._fail(f"ffmpeg did not finish within {self.timeout:.0f} s")
        if self._video_error is not None:
            self._fail("ffmpeg stopped while encoding")
        try:
            self._proc.stdin.close()
            code = wait_exit(self._proc, max(1.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self._fail(f"ffmpeg did not finish within {self.timeout:.0f} s")
        self._audio.wait()
        if code != 0:
            self._fail("ffmpeg failed to encode the video")
        os.replace(self._partial, self.path)
        self.encode_seconds += time.perf_counter() - start
        self._cleanup()

    def _fail(self, what: str) -> None:
        try:  # let a dying ffmpeg finish writing its explanation
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._stderr.seek(0)
        stderr = self._stderr.read()
        log_stderr(what, self._proc.poll(), stderr)
        details = stderr_tail(stderr, lines=12, paths=[self._work, self.path, self.live_path or ""])
        self._abort()
        raise MediaError(f"{what}: {details}")

    def _abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stop_video_thread()
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        self._audio.end()
        self._audio.wait()  # ffmpeg is dead: the feeder's next write fails at once
        if self.live_path and os.path.exists(self.live_path):
            os.remove(self.live_path)
        self._cleanup()

    def _stop_video_thread(self) -> None:
        """End the feeder (ffmpeg is dead by now, so its writes fail at once): drop queued frames, signal."""
        while self._video_thread.is_alive():
            try:
                while True:
                    self._frames.get_nowait()
            except queue.Empty:
                pass
            try:
                self._frames.put_nowait(None)
            except queue.Full:
                pass
            self._video_thread.join(timeout=0.2)

    def _cleanup(self) -> None:
        self._stderr.close()
        shutil.rmtree(self._work, ignore_errors=True)


def _tee_escape(path: str) -> str:
    """A file name as ffmpeg's tee muxer reads it (its separators backslash-escaped)."""
    return "".join("\\" + c if c in "\\|[]" else c for c in os.path.abspath(path))
