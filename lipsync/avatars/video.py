"""Video avatars: a short recording of the presenter, looped under any length of speech.

``register_video`` does everything expensive once, at upload:

* decode (any container/codec ffmpeg reads, through OpenCV), scale to output size;
  a frame rate of 24-60 fps is kept as it is (29.97 stays 30000/1001), any other is
  resampled to ``default_fps``;
* find the face: the detector on the first frames until it sees one (the reference
  frame), then the face mesh every ``TRACK_EVERY`` frames from the last position (the
  mouth's centre is the tracked point); the detector again every
  ``CHECK_FACES_EVERY_S`` (a second face there is refused) and while the face is lost;
* positions between samples interpolated, gaps up to ``MAX_GAP_S`` bridged, then
  smoothed over ``SMOOTH_FRAMES`` frames (Wav2Lip's window); frames in longer gaps
  (the face left the picture) are marked to be left untouched;
* store the ping-pong cycle (frames 0 .. N-1, then N-2 .. 1) as one H.264 file at
  near-lossless quality, encoded in parallel with the tracking; played in a loop it
  never jumps (``lipsync.media.frames.LoopedFrames``).

The face keeps the size it has on the reference frame: every frame's box is the
reference box moved with the tracked mouth (a presenter who walks towards the camera
is not followed in scale).
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from lipsync.errors import InvalidInputError, MediaError, NoFaceError, PayloadTooLargeError
from lipsync.faces.box import FaceBox
from lipsync.faces.landmarks import (
    LIPS_OUTER_LOWER,
    LIPS_OUTER_UPPER,
    Landmarks,
    face_landmarks,
    follow_landmarks,
)
from lipsync.media.ffmpeg import ffmpeg_exe, log_stderr, stderr_tail
from lipsync.media.video import fit_to_height

MIN_FPS, MAX_FPS = 24, 60      # frame rates kept as they are
TRACK_EVERY = 2                # frames between two face-mesh samples
SMOOTH_FRAMES = 5              # moving average of the positions (Wav2Lip's face-box window)
MAX_GAP_S = 0.5                # a face lost for longer: those frames are left untouched
CHECK_FACES_EVERY_S = 5.0      # the detector looks for a second face this often
LOST_RETRY_S = 0.5             # ... and for the lost face this often
MAX_JUMP = 0.25                # a mesh sample this far (x box width) from the last one is a lost face
# The stored footage: near-lossless, and fast to write and to read (ultrafast: 3-4x veryfast's
# speed on a 2-core machine, for files about twice as large).
STORE_CRF, STORE_PRESET = 15, "ultrafast"
BASE_NAME, TRACK_NAME = "base.mp4", "track.json"


@dataclass(frozen=True)
class VideoBase:
    """A video avatar's footage as the renderer uses it.

    path:      the stored cycle (``BASE_NAME``): width x height (even), yuv420p, ``fps``.
    fps:       frames per second (a Fraction: 30000/1001 for 29.97).
    frames:    N, frames of the uploaded clip (the cycle has ``cycle`` = max(1, 2N - 2)).
    offsets:   (N, 2) int32: (dx, dy) pixels, even, of the face from where it is on the
               reference frame (the one the engine prepared).
    valid:     (N,) bool: False where the face is lost (the frame stays untouched).
    reference: index of the reference frame.
    """

    path: str
    width: int
    height: int
    fps: Fraction
    frames: int
    offsets: np.ndarray
    valid: np.ndarray
    reference: int = 0

    @property
    def cycle(self) -> int:
        """Frames of one loop: forward, then backward without repeating either end."""
        return max(1, 2 * self.frames - 2)

    def source_frame(self, k: int) -> int:
        """The clip's frame shown at output frame ``k`` (0-based, from the first frame of a video)."""
        c = k % self.cycle
        return c if c < self.frames else self.cycle - c

    def boxes(self, box: FaceBox) -> list[list[int] | None]:
        """Every frame's face box (``box`` is the reference frame's), None where lost."""
        return [[box.x1 + int(dx), box.y1 + int(dy), box.x2 + int(dx), box.y2 + int(dy)] if ok else None
                for (dx, dy), ok in zip(self.offsets.tolist(), self.valid.tolist())]

    def save_track(self, folder: str) -> None:
        """Write what is not in the MP4 (``TRACK_NAME``) next to it."""
        data = {"width": self.width, "height": self.height, "fps": [self.fps.numerator, self.fps.denominator],
                "frames": self.frames, "reference": self.reference,
                "offsets": self.offsets.tolist(), "valid": self.valid.astype(int).tolist()}
        with open(os.path.join(folder, TRACK_NAME), "w", encoding="utf-8") as f:
            json.dump(data, f)

    @classmethod
    def load(cls, folder: str) -> VideoBase:
        """The footage stored in ``folder`` by ``register_video`` + ``save_track``."""
        with open(os.path.join(folder, TRACK_NAME), encoding="utf-8") as f:
            data = json.load(f)
        return cls(path=os.path.join(folder, BASE_NAME), width=int(data["width"]), height=int(data["height"]),
                   fps=Fraction(*data["fps"]), frames=int(data["frames"]), reference=int(data["reference"]),
                   offsets=np.asarray(data["offsets"], np.int32).reshape(-1, 2),
                   valid=np.asarray(data["valid"], bool))


@dataclass(frozen=True)
class RegisteredVideo:
    """What ``register_video`` found: the footage, plus the reference frame (BGR, output
    size), its face box and face mesh for the engine's preparation."""

    base: VideoBase
    image: np.ndarray
    box: FaceBox
    landmarks: Landmarks | None
    source_fps: float


def looks_like_video(data: bytes) -> bool:
    """True for the containers users send clips in (MP4/MOV, WebM/MKV, AVI), by their magic bytes."""
    head = bytes(data[:16])
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free") or head[:4] == b"\x1a\x45\xdf\xa3" \
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


def register_video(data: bytes, folder: str, *, work_dir: str, max_height: int, max_seconds: float,
                   max_pixels: int, default_fps: int, find_faces: Callable[[np.ndarray], list[FaceBox]],
                   timeout: float = 300.0) -> RegisteredVideo:
    """Decode, track and store the clip ``data`` into ``folder`` (``BASE_NAME``; the caller
    saves the track). Raises 400 ``invalid_video``, 413 ``video_too_long`` /
    ``image_too_large``, 422 ``no_face`` / ``several_faces`` (with the frame number),
    ``MediaError`` when encoding fails."""
    with tempfile.TemporaryDirectory(prefix=".video-", dir=work_dir) as tmp:
        source = os.path.join(tmp, "upload")
        with open(source, "wb") as f:
            f.write(data)
        capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
        try:
            return _register(capture, folder, tmp, max_height=max_height, max_seconds=max_seconds,
                             max_pixels=max_pixels, default_fps=default_fps, find_faces=find_faces,
                             timeout=timeout)
        finally:
            capture.release()


def _register(capture: cv2.VideoCapture, folder: str, tmp: str, *, max_height, max_seconds, max_pixels,
              default_fps, find_faces, timeout) -> RegisteredVideo:
    if not capture.isOpened():
        raise InvalidInputError("the avatar file is neither a readable image nor a readable video",
                                code="invalid_video")
    src_fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if not (0 < src_fps <= 1000) or width <= 0 or height <= 0:
        raise InvalidInputError("the video has no readable frame rate or frame size", code="invalid_video")
    if width * height > max_pixels:
        raise InvalidInputError(f"the video is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted",
                                code="image_too_large")
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0
    if count / src_fps > max_seconds + 1.0 / src_fps:
        raise _too_long(count / src_fps, max_seconds)
    src_rate = Fraction(src_fps).limit_denominator(1001)
    fps = src_rate if MIN_FPS <= src_rate <= MAX_FPS else Fraction(default_fps)
    max_frames = int(math.floor(max_seconds * fps)) + 1

    tracker = _Tracker(fps, find_faces)
    raw_path = os.path.join(tmp, "frames.yuv")
    encoder: _CycleEncoder | None = None
    n = 0  # frames kept
    try:
        with open(raw_path, "wb") as raw:
            index = 0
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                # The kept frames at the output rate that fall on this source frame (one each, when kept as is).
                while int(n * src_rate / fps) == index:
                    if n >= max_frames:
                        raise _too_long(n / fps, max_seconds)
                    scaled = fit_to_height(frame, max_height)
                    if encoder is None:
                        encoder = _CycleEncoder(os.path.join(folder, BASE_NAME), scaled.shape[1], scaled.shape[0],
                                                fps, timeout)
                    elif scaled.shape[:2] != (encoder.height, encoder.width):
                        raise InvalidInputError("the video changes its frame size", code="invalid_video")
                    yuv = cv2.cvtColor(scaled, cv2.COLOR_BGR2YUV_I420)
                    raw.write(yuv.tobytes())
                    encoder.write(yuv)
                    tracker.add(n, scaled)
                    n += 1
                index += 1
        if encoder is None:
            raise InvalidInputError("the video has no frame that can be decoded", code="invalid_video")
        tracker.finish(n)
        # The way back: frames N-2 .. 1 (read from the raw copy: decoding a video backwards is slow).
        frames = np.memmap(raw_path, np.uint8, "r", shape=(n, encoder.height * 3 // 2, encoder.width))
        for k in range(n - 2, 0, -1):
            encoder.write(np.array(frames[k]))
        del frames
        encoder.close()
    except BaseException:
        if encoder is not None:
            encoder.abort()
        raise
    offsets, valid = tracker.offsets(n)
    base = VideoBase(path=os.path.join(folder, BASE_NAME), width=encoder.width, height=encoder.height, fps=fps,
                     frames=n, offsets=offsets, valid=valid, reference=tracker.reference)
    return RegisteredVideo(base=base, image=tracker.reference_image, box=tracker.box,
                           landmarks=tracker.reference_landmarks, source_fps=src_fps)


def _too_long(seconds: float, limit: float) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the video lasts {seconds:.1f} s or more; at most {limit:g} s are accepted",
                                code="video_too_long")


def _mouth_centre(landmarks: Landmarks) -> np.ndarray:
    return landmarks.take(LIPS_OUTER_UPPER + LIPS_OUTER_LOWER).mean(axis=0).astype(np.float64)


class _Tracker:
    """The face through the clip, frame by frame as they are decoded (see module doc)."""

    def __init__(self, fps: Fraction, find_faces):
        self.fps = float(fps)
        self.find_faces = find_faces
        self.check_every = max(1, round(CHECK_FACES_EVERY_S * self.fps))
        self.retry_every = max(1, round(LOST_RETRY_S * self.fps))
        self.reference: int | None = None
        self.reference_image: np.ndarray | None = None
        self.reference_landmarks: Landmarks | None = None
        self.box: FaceBox | None = None
        self._centre0: np.ndarray | None = None   # the mouth on the reference frame
        self._last: np.ndarray | None = None      # the last offset seen
        self._lost_at: int | None = None
        self._previous: Landmarks | None = None   # the last face mesh found
        self.samples: dict[int, np.ndarray] = {}  # frame -> offset (float)

    def _one_face(self, index: int, image: np.ndarray) -> FaceBox | None:
        faces = self.find_faces(image)
        if len(faces) > 1:  # the detector also fires on face-like patterns: the mesh must agree
            faces = [b for b in faces if face_landmarks(image, b) is not None] or faces[:1]
        if len(faces) > 1:
            boxes = ", ".join(str(b.as_list()) for b in faces[:4])
            raise NoFaceError(f"the uploaded video shows {len(faces)} faces (frame {index}: {boxes}); "
                              "an avatar needs exactly one", code="several_faces")
        return faces[0] if faces else None

    def add(self, index: int, image: np.ndarray) -> None:
        if self.reference is None:
            if index % self.retry_every == 0:
                box = self._one_face(index, image)
                if box is not None:
                    self._start(index, image, box)
            return
        if index % self.check_every == 0:
            self._one_face(index, image)
        if index % TRACK_EVERY and self._lost_at is None:
            return
        # Where the face was (one pass of the mesh); after losing it, where it was last seen.
        landmarks = follow_landmarks(image, self._previous) if self._previous is not None else \
            face_landmarks(image, self._shifted(self._last))
        if landmarks is None and self._lost_at is not None and (index - self._lost_at) % self.retry_every == 0:
            found = self._one_face(index, image)
            if found is not None:
                landmarks = face_landmarks(image, found)
        if landmarks is not None:
            offset = _mouth_centre(landmarks) - self._centre0
            if np.abs(offset - self._last).max() <= MAX_JUMP * self.box.width or self._lost_at is not None:
                self.samples[index] = offset
                self._last, self._previous = offset, landmarks
                self._lost_at = None
                return
        self._previous = None
        if self._lost_at is None:
            self._lost_at = index

    def _start(self, index: int, image: np.ndarray, box: FaceBox) -> None:
        landmarks = face_landmarks(image, box)
        self.reference, self.box = index, box
        self.reference_image = image.copy()
        self.reference_landmarks = landmarks
        self._centre0 = _mouth_centre(landmarks) if landmarks is not None else \
            np.array([(box.x1 + box.x2) / 2, box.y1 + 0.75 * box.height])
        self._last, self._previous = np.zeros(2), landmarks
        self.samples[index] = self._last

    def _shifted(self, offset: np.ndarray) -> FaceBox:
        dx, dy = (int(round(v)) for v in offset)
        return FaceBox(self.box.x1 + dx, self.box.y1 + dy, self.box.x2 + dx, self.box.y2 + dy)

    def finish(self, frames: int) -> None:
        if self.reference is None:
            raise NoFaceError(f"no face found in the uploaded video (looked at {frames} frames, every "
                              f"{self.retry_every}th from frame 0)", code="no_face")

    def offsets(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 2) int32 even offsets and (n,) validity (see ``VideoBase``)."""
        known = np.array(sorted(self.samples), np.int64)
        values = np.array([self.samples[i] for i in known], np.float64).reshape(-1, 2)
        frames = np.arange(n)
        gap = max(TRACK_EVERY, round(MAX_GAP_S * self.fps))
        # A frame is covered when the samples around it are at most ``gap`` apart (or it is
        # within ``gap`` of the first/last sample, where the position is held).
        right = np.searchsorted(known, frames)               # first sample >= frame
        after = known[np.minimum(right, known.size - 1)]
        before = known[np.maximum(right - 1, 0)]
        exact = after == frames
        valid = exact | ((right > 0) & (right < known.size) & (after - before <= gap))
        valid |= (frames < known[0]) & (known[0] - frames <= TRACK_EVERY)
        valid |= (frames > known[-1]) & (frames - known[-1] <= TRACK_EVERY)
        track = np.stack([np.interp(frames, known, values[:, a]) for a in (0, 1)], axis=1)
        # Smooth within each covered run only (a lost stretch must not pull its neighbours).
        smooth = track.copy()
        half = SMOOTH_FRAMES // 2
        for start, stop in _runs(valid):
            part = track[start:stop]
            padded = np.pad(part, ((half, half), (0, 0)), mode="edge")
            kernel = np.ones(SMOOTH_FRAMES) / SMOOTH_FRAMES
            smooth[start:stop] = np.stack([np.convolve(padded[:, a], kernel, mode="valid") for a in (0, 1)], axis=1)
        offsets = (2 * np.round(smooth / 2)).astype(np.int32)  # whole chroma samples: the paste stays in I420
        offsets[~valid] = 0
        return offsets, valid


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


class _CycleEncoder:
    """x264 in its own process, fed I420 frames from a thread (so encoding runs beside the tracking)."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, timeout: float):
        if width % 2 or height % 2:
            raise InvalidInputError("the video is too small", code="invalid_video")
        self.path, self.width, self.height, self.timeout = path, width, height, timeout
        self._stderr = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
               "-c:v", "libx264", "-preset", STORE_PRESET, "-crf", str(STORE_CRF), "-pix_fmt", "yuv420p",
               "-g", str(max(1, round(2 * fps))), "-an", "-movflags", "+faststart", "-f", "mp4", path]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)
        except OSError as exc:
            self._stderr.close()
            raise MediaError(f"cannot start ffmpeg ({cmd[0]}): {exc.strerror or exc}") from None
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name="video-avatar-encode", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        try:
            while (frame := self._queue.get()) is not None:
                self._proc.stdin.write(memoryview(frame).cast("B"))
            self._proc.stdin.close()
        except (OSError, ValueError) as exc:
            self._error = exc

    def write(self, frame: np.ndarray | None) -> None:
        """Queue one (H * 3 // 2, W) I420 frame (None: the end)."""
        while True:
            if self._error is not None or (self._proc.poll() is not None and frame is not None):
                self._fail()
            try:
                self._queue.put(frame, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finish the file; ``MediaError`` with ffmpeg's stderr when it failed."""
        self.write(None)
        self._thread.join(timeout=self.timeout)
        try:
            code = self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0 or self._error is not None:
            self._fail()
        self._stderr.close()

    def _fail(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read()
        log_stderr("storing a video avatar failed", self._proc.returncode, stderr)
        self.abort()
        raise MediaError(f"storing the video avatar failed: {stderr_tail(stderr, lines=6, paths=[self.path])}")

    def abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._queue.put(None)
            self._thread.join(timeout=0.2)
        if not self._stderr.closed:
            self._stderr.close()
