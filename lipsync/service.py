"""The whole pipeline behind one object, shared by the web app and the CLI.

``LipsyncService.load()`` does the slow work once (avatar, face box, engine,
TTS voice); ``generate()`` then turns text or a recording into an MP4:

    text -> TTS -> 16 kHz speech -> engine patches -> composite -> ffmpeg MP4
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction

import cv2
import numpy as np

from lipsync.avatars.library import DEFAULT_ID as DEFAULT_AVATAR
from lipsync.avatars.library import AvatarLibrary, AvatarRecord
from lipsync.avatars.video import RegisteredVideo, looks_like_video, register_video
from lipsync.devices import cuda_device
from lipsync.engines.base import Engine, PreparedAvatar
from lipsync.engines.models import ModelSet, load_models
from lipsync.errors import InvalidInputError, LipsyncError, PayloadTooLargeError
from lipsync.faces.box import FaceBox, Rect
from lipsync.faces.landmarks import face_landmarks
from lipsync.inputs import check_speech_estimate, check_speech_length, check_text, recording_samples
from lipsync.media import audio, ffmpeg, frames, video
from lipsync.media.frames import LoopedFrames
from lipsync.media.segments import SegmentedMp4Writer
from lipsync.memory import release_memory
from lipsync.motion.idle import apply_idle, idle_track, map_buffers, prepare_idle
from lipsync.settings import Settings
from lipsync.tts.base import Speech, validate_request
from lipsync.tts.text import split_sentences

log = logging.getLogger("lipsync")

# Avatar images decoded at once per process (uploads of /api/generate and of job submissions,
# AVATAR_PATH): a 40-megapixel image takes a few hundred MB while it is decoded.
AVATAR_DECODES = 2
# Video avatars: frames whose speech is this quiet (of the piece's loudest frame), with no louder
# frame within QUIET_MARGIN frames, show the footage untouched.
QUIET_LEVEL = 0.05
QUIET_MARGIN = 2

# progress(stage, fraction): stage is "tts", "lipsync" or "encode", fraction in [0, 1]. (There is no
# stage between TTS and lip-sync: each piece's mel features are computed inside the engine's render,
# while the next sentence is being synthesised, so that time is part of "lipsync".)
ProgressCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced: the MP4 at ``path`` and how long each stage took (ms)."""

    path: str
    duration: float          # seconds of speech (and video)
    frames: int
    engine: str
    timings: dict[str, float] = field(default_factory=dict)
    # (start, end) seconds of each spoken piece (sentence) in the video, in order
    segments: tuple[tuple[float, float], ...] = ()
    language: str | None = None  # the voice that spoke the text ("auto" resolved); None for a recording


def default_avatar() -> np.ndarray:
    """The built-in avatar: scikit-image's public-domain ``astronaut`` portrait, BGR."""
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def create_wav2lip(settings: Settings, checkpoint: str) -> Engine:
    """One Wav2Lip engine for ``checkpoint``, with the settings' device, batch size and speed paths."""
    from lipsync.engines.wav2lip.engine import Wav2LipEngine  # imports torch: only when needed

    return Wav2LipEngine(checkpoint, device=settings.device, batch_size=settings.batch_size,
                         precision=settings.wav2lip_precision, backend=settings.wav2lip_backend,
                         mouth_only=settings.wav2lip_mouth_only)


class LipsyncService:
    """Preloaded resources plus the request pipeline. Thread-safe after ``load()``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.ffmpeg_binary:  # process-wide: there is one ffmpeg per machine
            ffmpeg.use_binary(settings.ffmpeg_binary)
        self.status = "loading"          # loading | ready | error
        self.error: str | None = None
        self.models: ModelSet | None = None
        self.engine: Engine | None = None  # the default model's
        self.tts = None
        self.faces = None
        self.avatar: PreparedAvatar | None = None
        self.avatars: AvatarLibrary | None = None
        self._avatar_jpeg: bytes | None = None
        self._ready = threading.Event()
        self._decode_slots = threading.BoundedSemaphore(AVATAR_DECODES)
        self._decode_held = threading.local()  # .held: this thread holds a slot
        self._gpu = None  # the CUDA device frames are made on, False for none (_on_gpu)
        self.video_encoder: str | None = None  # VIDEO_ENCODER resolved against this ffmpeg (load)

    # ----------------------------------------------------------------- loading
    def load(self) -> LipsyncService:
        """Load avatar, face box, engine and TTS voice. Sets ``status``; never raises."""
        from lipsync.faces import FaceLocator
        from lipsync.tts import create_provider

        started = time.perf_counter()
        try:
            s = self.settings
            self.video_encoder = video.resolve_encoder(s.video_encoder)
            if s.video_encoder == "auto" and self.video_encoder == "x264":
                log.warning("VIDEO_ENCODER=auto: x264, because the ffmpeg at %s has no libopenh264 (less than "
                            "half x264's CPU a frame); the pip-bundled ffmpeg has it: FFMPEG_BINARY=$(python -c "
                            "'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')", ffmpeg.ffmpeg_exe())
            self.tts = create_provider(s)
            self.faces = FaceLocator(detector=s.face_detector, s3fd_path=s.s3fd_path, device=s.device,
                                     cache_dir=s.cache_dir, box_override=s.face_box)
            # Looked up through the module at call time, so a benchmark can build engines its own way.
            self.models = load_models(s, lambda settings, path: create_wav2lip(settings, path))
            self.engine = self.models.engine()
            if s.avatar_path:
                self.avatar = self.avatar_from_bytes(self._read_avatar_file(s.avatar_path))
            else:
                self.avatar = self.prepare_avatar(default_avatar())
            _, jpeg = cv2.imencode(".jpg", self.avatar.image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            self._avatar_jpeg = jpeg.tobytes()
            self.avatars = AvatarLibrary(s.resolved_avatars_dir, self.models, self.prepare_avatar,
                                         self.prepare_scaled, self.faces.faces, register_video=self._register_video,
                                         max_per_owner=s.max_avatars)
            self.avatars.set_default(self.avatar, os.path.basename(s.avatar_path) if s.avatar_path
                                     else "built-in portrait")
            self.status = "ready"
            log.info("ready in %.1f s: %s", time.perf_counter() - started, self.describe())
        except Exception as exc:  # noqa: BLE001 - reported through health, never crashes the server
            self.status = "error"
            self.error = exc.message if isinstance(exc, LipsyncError) else f"{type(exc).__name__}: {exc}"
            log.exception("loading failed")
        finally:
            self._ready.set()
        return self

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """Block until ``load()`` has finished (ready or error)."""
        return self._ready.wait(timeout)

    @staticmethod
    def _read_avatar_file(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise InvalidInputError(f"cannot read the avatar image {path}: {exc.strerror}",
                                    code="invalid_image") from None

    def decode_avatar(self, data: bytes) -> np.ndarray:
        """An avatar image's bytes as (H, W, 3) uint8 BGR, upright (EXIF orientation applied), within
        ``MAX_IMAGE_PIXELS``. A large image is decoded at 1/2, 1/4 or 1/8 of its size when it
        stays at least twice the output height (face detectors look at 640 pixels, the video at
        its output height), except with ``FACE_BOX``, whose pixels are those of the full image.
        At most ``AVATAR_DECODES`` decodes run at once; the memory is given back after each."""
        shrink_to = 0 if self.settings.face_box is not None else 2 * self.settings.output_height(self._on_gpu())
        with self._decoding():
            return video.decode_image(data, self.settings.max_image_pixels, shrink_to=shrink_to)

    def check_avatar(self, data: bytes) -> None:
        """Refuse (400) avatar bytes that ``decode_avatar`` would refuse, decoding them at the
        smallest size (for a job: its avatar is decoded again when it runs)."""
        with self._decoding():
            video.decode_image(data, self.settings.max_image_pixels, shrink_to=1)

    def avatar_from_bytes(self, data: bytes, model: str | None = None) -> PreparedAvatar:
        """``prepare_avatar(decode_avatar(data), model)``, the full-size image living only in between."""
        with self._decoding():
            return self.prepare_avatar(self.decode_avatar(data), model)

    @contextlib.contextmanager
    def _decoding(self):
        """One of the ``AVATAR_DECODES`` slots (re-entrant for the thread holding one), then the
        freed memory back to the OS."""
        if getattr(self._decode_held, "held", False):
            yield
            return
        with self._decode_slots:
            self._decode_held.held = True
            try:
                yield
            finally:
                self._decode_held.held = False
                release_memory()

    def add_avatar(self, data: bytes, name: str | None = None, owner: str | None = None,
                   model: str | None = None) -> AvatarRecord:
        """Decode an uploaded avatar image or video clip, check it shows exactly one face, prepare
        and store it in the library (``lipsync.avatars``); returns its entry. ``model``: the
        avatar's preferred model (requests on it without a ``model`` get that one)."""
        if model is not None:
            self.models.resolve(model)  # 400 unknown_model before any work
        with self._decoding():
            if looks_like_video(data):
                return self.avatars.add_video(data, name, owner, model)
            return self.avatars.add(self.decode_avatar(data), name, owner, model)

    def _register_video(self, data: bytes, folder: str) -> RegisteredVideo:
        s = self.settings
        return register_video(data, folder, work_dir=self.temp_root(),
                              max_height=s.output_height(self._on_gpu(), video=True), max_seconds=s.max_avatar_seconds,
                              max_pixels=s.max_image_pixels, default_fps=s.fps, find_faces=self.faces.faces,
                              timeout=s.ffmpeg_timeout)

    def prepare_avatar(self, image: np.ndarray, model: str | None = None) -> PreparedAvatar:
        """Scale an avatar to output size, find its face (cached) and let ``model`` (default: the
        default model) prepare it."""
        # Detect (and cache, and apply FACE_BOX) on the image as the user gave
        # it, then scale the box with the image to output size.
        box = self.faces.locate(image)
        s = self.settings
        scaled = video.fit_to_height(image, s.output_height(self._on_gpu()), s.max_output_pixels)
        box = box.scaled(scaled.shape[0] / image.shape[0]).clip(scaled.shape[1], scaled.shape[0])
        return self.prepare_scaled(scaled, box, model)

    def prepare_scaled(self, image: np.ndarray, box: FaceBox, model: str | None = None, *,
                       idle: bool = True) -> PreparedAvatar:
        """``model``'s preparation of an avatar already at output size, plus its idle-motion rig
        (``idle``; the face mesh found once for both)."""
        landmarks = face_landmarks(image, box)
        prepared = self.models.engine(model).prepare(image, box, landmarks=landmarks)
        return replace(prepared, idle=prepare_idle(prepared.image, box, landmarks) if idle else None)

    def describe(self) -> dict:
        """Health details: engine, checkpoint, device, TTS provider, face detector."""
        info = {"status": self.status, "models_loaded": self.engine is not None and self.tts is not None,
                "avatar_loaded": self.avatar is not None}
        if self.engine is not None:
            info.update(self.engine.describe())
            info["model"] = self.models.default
            info["models"] = self.models.names
        else:
            info.update({"engine": None, "checkpoint": None, "version": None, "device": None})
        info["tts_provider"] = getattr(self.tts, "name", None)
        info["video_encoder"] = self.video_encoder
        if self.faces is not None:
            info["face_detector"] = self.faces.describe().get("detector")
        if self.avatar is not None:
            info["avatar"] = {"width": self.avatar.image.shape[1], "height": self.avatar.image.shape[0],
                              "face_box": self.avatar.box.as_list()}
        if self.error:
            info["error"] = self.error
        return info

    @property
    def avatar_jpeg(self) -> bytes | None:
        """The avatar as served to the page (output size, JPEG)."""
        return self._avatar_jpeg

    # ------------------------------------------------------------- validation
    def validate_text(self, text, language, *, allow_mismatch: bool = False) -> tuple[str, str]:
        """Check a text request; returns (text, language to speak) or raises a 4xx ``LipsyncError``.

        ``language`` may be ``"auto"`` (chosen from the text's letters); an explicit one that does
        not fit the text's script is refused (``language_mismatch``) unless ``allow_mismatch``."""
        check_text(text)
        if len(text) > self.settings.max_text_chars:
            raise PayloadTooLargeError(f"'text' has {len(text)} characters; the limit is "
                                       f"{self.settings.max_text_chars}", code="text_too_long")
        text, language = validate_request(text, language, allow_mismatch=allow_mismatch)
        check_speech_estimate(text, language, self.settings.max_speech_seconds)
        breaker = getattr(self.tts, "breaker", None)
        if breaker is not None:  # remote TTS known to be down: 503 now, before any work is queued
            breaker.check()
        return text, language

    def speech_from_recording(self, data: bytes) -> Speech:
        """An uploaded recording as 16 kHz speech: the server's normalised WAV as it is, any
        other format ffmpeg reads decoded (``inputs.recording_samples``: limits checked there)."""
        return Speech(samples=recording_samples(data, self.settings, self.temp_root()))

    # -------------------------------------------------------------- pipeline
    def generate(self, out_path: str, *, text: str | None = None, language: str | None = None,
                 recording: bytes | None = None, avatar_image: bytes | None = None,
                 progress: ProgressCallback | None = None, live_path: str | None = None,
                 allow_mismatch: bool = False, avatar_id: str | None = None,
                 owner: str | None = None, idle_motion: bool | None = None,
                 model: str | None = None) -> GenerationResult:
        """Make the MP4 at ``out_path`` from ``text`` (+ ``language``) or a ``recording``.

        Long texts are spoken sentence by sentence: the next sentence is
        synthesised while the current one is lip-synced and encoded, and all
        go into one MP4. ``avatar_image`` optionally replaces the preloaded
        avatar for this request only; ``avatar_id`` picks one of the library's
        entries that ``owner`` (an API key id, or None) may use. ``idle_motion``
        (default ``IDLE_MOTION``) adds blinks, head sway and breathing, the same
        for the same input. ``model`` names the lip-sync model (default: the
        avatar's preferred one, else the default model; 400 ``unknown_model``
        for a name that is not loaded). ``live_path``, when given, receives a
        fragmented MP4 that grows while rendering (for streaming playback).
        Raises ``LipsyncError`` subclasses for bad input; an exception raised
        by ``progress`` aborts the render. On any failure nothing is left at
        ``out_path`` or ``live_path``.
        """
        if self.status != "ready":
            raise LipsyncError(f"the service is not ready ({self.status})", code="not_ready", status=503)
        report = progress or (lambda stage, fraction: None)
        timings: dict[str, float] = {}
        started = time.perf_counter()

        if recording is None:
            text, language = self.validate_text(text, language, allow_mismatch=allow_mismatch)
        if avatar_image is not None and avatar_id is not None:
            raise InvalidInputError("give either an 'avatar' image or an 'avatar_id', not both",
                                    code="conflicting_inputs")
        if avatar_image is not None:
            model = self.models.resolve(model)
            avatar = self.avatar_from_bytes(avatar_image, model)
            timings["avatar"] = _ms_since(started)
        else:
            record = self.avatars.get(avatar_id or DEFAULT_AVATAR, owner)
            model = self.models.resolve(model, record.model)
            avatar = self.avatars.prepared(record.id, owner, model)
            if avatar_id is not None:
                timings["avatar"] = _ms_since(started)
        engine = self.models.engine(model)

        report("tts", 0.0)
        if recording is not None:
            t = time.perf_counter()
            pieces: SpeechPieces = SpeechPieces.single(self.speech_from_recording(recording))
            timings["decode"] = _ms_since(t)
        else:
            pieces = SpeechPieces.synthesised(self.tts, split_sentences(text), language,
                                              max_seconds=self.settings.max_speech_seconds)
        idle = self.settings.idle_motion if idle_motion is None else bool(idle_motion)
        seed = zlib.crc32(recording if recording is not None else f"{language}:{text}".encode())
        try:
            frames, segments = self._render(pieces, engine, avatar, out_path, live_path, timings, report,
                                            idle_seed=seed if idle else None)
        finally:
            pieces.close()
        if recording is None:
            timings["tts"] = pieces.tts_seconds * 1000.0
        timings["total"] = _ms_since(started)
        return GenerationResult(path=out_path, duration=segments[-1][1], frames=frames, segments=segments,
                                engine=model, timings=timings,
                                language=None if recording is not None else language)

    def _render(self, pieces: SpeechPieces, engine: Engine, avatar: PreparedAvatar, out_path: str,
                live_path: str | None,
                timings: dict[str, float], report: ProgressCallback,
                idle_seed: int | None = None) -> tuple[int, tuple]:
        """Lip-sync and encode every piece of speech into one MP4; returns (frames, segments).
        With ``idle_seed`` (and a rig on the avatar) every frame gets the idle motion."""
        footage = avatar.video
        rig = avatar.idle if idle_seed is not None and footage is None else None
        moved = np.empty_like(avatar.image) if rig is not None else None
        maps = map_buffers(rig) if rig is not None else None
        # A video avatar plays at its own frame rate (e.g. 30000/1001), a photo at FPS.
        fps, rate = (footage.fps if footage is not None else self.settings.fps), audio.SAMPLE_RATE
        segments: list[tuple[float, float]] = []
        height, width = avatar.image.shape[:2]
        engine_s = composite_s = 0.0
        # A photo's frames are made on the GPU when there is one (lipsync.media.gpu_frames: the same frames).
        gpu = self._frames_on_gpu(avatar, rig) if footage is None else None
        on_device = gpu is not None and getattr(engine, "patch_device", None) is not None
        with self._writer(out_path, width, height, fps, live_path) as writer, \
                (LoopedFrames(footage.path, width, height, timeout=self.settings.ffmpeg_timeout)
                 if footage is not None else contextlib.nullcontext()) as base_frames:
            for index, speech in enumerate(pieces):
                # Pad each piece with silence to a whole number of frames, so
                # sound and picture stay in step across pieces and at the end.
                samples = pad_to_frames(speech.samples, fps, rate)
                segments.append((writer.audio_samples / rate, (writer.audio_samples + len(samples)) / rate))
                writer.write_audio(samples)
                if index == pieces.count - 1:  # the last piece (a skipped empty one: the writer's exit ends it)
                    writer.end_audio()  # the sound can be finished while the frames are made
                wanted = int(len(samples) * fps // rate)
                if footage is not None:
                    seconds = self._render_video_piece(
                        engine, avatar, base_frames, writer, Speech(samples, rate, speech.phonemes), wanted,
                        lambda part, i=index: report("lipsync", min(1.0, (i + part) / pieces.count)))
                    engine_s += seconds[0]
                    composite_s += seconds[1]
                    continue
                done = 0
                motion = None
                if rig is not None:
                    motion = idle_track(wanted, fps, idle_seed, rig.face_height,
                                        mouth_open=audio.frame_loudness(samples, wanted, fps, rate),
                                        first=writer.frames)
                speech = Speech(samples, rate, speech.phonemes)
                # The writer's order: a segmented one takes the frames of all its segments in turn.
                order = writer.frame_order(wanted)
                in_turn = None if np.array_equal(order, np.arange(wanted)) else order
                patches = (engine.render(avatar, speech, fps, on_device=True, order=in_turn) if on_device
                           else engine.render(avatar, speech, fps, order=in_turn))
                # A batch's frames on the GPU, handed on once the next batch is queued behind them (the
                # GPU stays busy meanwhile); the first at once (a stream's first fragment).
                queued = None
                try:
                    while done < wanted:
                        t = time.perf_counter()
                        batch = next(patches)[: wanted - done]
                        engine_s += time.perf_counter() - t
                        t, encode_before = time.perf_counter(), writer.encode_seconds
                        numbers = order[done:done + len(batch)]
                        if gpu is not None:
                            launched = gpu.launch(batch, numbers, motion)
                            handed, queued = (launched, None) if done == 0 else (queued, launched)
                            for frame in gpu.ready(handed or []):
                                writer.write_i420(frame)
                        elif motion is None and width % 2 == 0 and height % 2 == 0:
                            # A still head: only the mouth's box is converted to I420 (the same bytes).
                            for frame in video.composite_i420(avatar, [batch]):
                                writer.write_i420(frame)
                        else:
                            for number, frame in zip(numbers, video.composite(avatar, [batch])):
                                if motion is not None:
                                    frame = apply_idle(frame, rig, motion, int(number), out=moved, maps=maps)
                                writer.write(frame)
                        composite_s += time.perf_counter() - t - (writer.encode_seconds - encode_before)
                        done += len(batch)
                        report("lipsync", min(1.0, (index + done / wanted) / pieces.count))
                    if queued is not None:
                        t, encode_before = time.perf_counter(), writer.encode_seconds
                        for frame in gpu.ready(queued):
                            writer.write_i420(frame)
                        composite_s += time.perf_counter() - t - (writer.encode_seconds - encode_before)
                finally:
                    patches.close()
            report("encode", 0.0)
        report("encode", 1.0)
        timings["lipsync"] = engine_s * 1000.0
        timings["composite"] = composite_s * 1000.0
        timings["encode"] = writer.encode_seconds * 1000.0
        return writer.frames, tuple(segments)

    def _writer(self, path: str, width: int, height: int, fps, live_path: str | None):
        """The MP4 writer of one request: segments encoded at once on every core
        (``ENCODE_WORKERS``), or one stream when the request streams (its live copy is
        one growing file) or the machine is small. A stream keeps ``VIDEO_ENCODER``: openh264's
        one thread finishes a long stream later than x264's frame threads on a big machine, but
        has no frame delay, so its first fragment comes sooner (docs/PERFORMANCE.md "Issue 14")."""
        s = self.settings
        workers, threads = s.encode_layout(self.video_encoder)
        if live_path is None and workers > 1 and width % 2 == 0 and height % 2 == 0:
            return SegmentedMp4Writer(path, width, height, fps, sample_rate=audio.SAMPLE_RATE, preset=s.x264_preset,
                                      crf=s.x264_crf, timeout=s.ffmpeg_timeout, workers=workers, threads=threads,
                                      encoder=self.video_encoder)
        return video.Mp4Writer(path, width, height, fps, sample_rate=audio.SAMPLE_RATE, preset=s.x264_preset,
                               crf=s.x264_crf, threads=s.x264_threads, timeout=s.ffmpeg_timeout, live_path=live_path,
                               encoder=self.video_encoder)

    def _on_gpu(self):
        """The CUDA device frames are made on, when there is one and ``DEVICE`` allows it (else None)."""
        if self._gpu is None:
            self._gpu = cuda_device(self.settings.device) or False
        return self._gpu or None

    def _frames_on_gpu(self, avatar: PreparedAvatar, rig):
        """A ``GpuFrames`` for this request's frames on the GPU (None: made on the CPU)."""
        device = self._on_gpu()
        if device is None:
            return None
        from lipsync.media.gpu_frames import GpuFrames  # imports torch

        return GpuFrames(avatar, device, rig)

    def _render_video_piece(self, engine: Engine, avatar: PreparedAvatar, base_frames: LoopedFrames,
                            writer: video.Mp4Writer,
                            speech: Speech, wanted: int, progress: Callable[[float], None]) -> tuple[float, float]:
        """One piece of speech on a video avatar: ``wanted`` frames of its looping footage, from
        where the previous piece stopped, with the engine's mouth pasted where the face is in
        each; frames with silence around them, or whose face is lost, are written untouched.
        Returns the seconds spent (lip-sync, compositing)."""
        footage = avatar.video
        region, first = avatar.region, writer.frames
        # The engine's region inside a window with even corners: pasted into I420 planes as it is.
        window = frames.even_window(region, footage.width, footage.height)
        oy, ox = region.y1 - window.y1, region.x1 - window.x1
        rows, cols = slice(oy, oy + region.height), slice(ox, ox + region.width)
        mask = np.zeros((window.height, window.width), np.float32)
        mask[rows, cols] = avatar.mask[..., 0]
        chroma = frames.chroma_weights(mask)
        loud = audio.frame_loudness(speech.samples, wanted, float(footage.fps)) > QUIET_LEVEL
        near_sound = np.convolve(loud, np.ones(2 * QUIET_MARGIN + 1), mode="same") > 0
        still = avatar.image[region.y1:region.y2, region.x1:region.x2]
        pending: collections.deque = collections.deque()

        def crops():
            crop = still
            for i in range(wanted):
                frame = base_frames.read()
                j = footage.source_frame(first + i)
                dx, dy = (int(v) for v in footage.offsets[j])
                moved = Rect(window.x1 + dx, window.y1 + dy, window.x2 + dx, window.y2 + dy)
                inside = moved.x1 >= 0 and moved.y1 >= 0 and moved.x2 <= footage.width and moved.y2 <= footage.height
                if footage.valid[j] and inside and near_sound[i]:
                    bgr = frames.i420_to_bgr(frame, moved)
                    crop = bgr[rows, cols]
                    pending.append((frame, moved, bgr, crop))
                else:
                    pending.append((frame, None, None, None))
                yield crop
            while True:  # an engine may draw a frame or two past the piece's end: never shown
                yield crop

        engine_s = composite_s = 0.0
        patches = engine.render(avatar, speech, float(footage.fps), crops=crops())
        try:
            done = 0
            while done < wanted:
                t = time.perf_counter()
                batch = next(patches)[: wanted - done]
                engine_s += time.perf_counter() - t
                t, encode_before = time.perf_counter(), writer.encode_seconds
                for patch in batch:
                    frame, moved, bgr, crop = pending.popleft()
                    if moved is not None and not np.array_equal(patch, crop):
                        bgr[rows, cols] = patch
                        frames.blend_i420(frame, moved, bgr, mask, chroma)
                    writer.write_i420(frame)
                composite_s += time.perf_counter() - t - (writer.encode_seconds - encode_before)
                done += len(batch)
                progress(done / wanted)
        finally:
            patches.close()
        return engine_s, composite_s

    def temp_root(self) -> str:
        """Folder for per-request working files (removed after each request)."""
        root = os.path.join(self.settings.output_dir, "tmp")
        os.makedirs(root, exist_ok=True)
        return root


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def pad_to_frames(samples: np.ndarray, fps: int | Fraction, rate: int = audio.SAMPLE_RATE) -> np.ndarray:
    """``samples`` followed by silence up to the next whole number of video frames.

    With a rate/fps that is not whole (16000/30, or 16000/(30000/1001)) the unit is the
    smallest whole number of samples that is also a whole number of frames (8008 samples
    = 15 frames at 29.97 fps).
    """
    fps = Fraction(fps)
    per_frame = rate * fps.denominator  # samples per frame = per_frame / fps.numerator
    unit = per_frame // math.gcd(per_frame, fps.numerator)
    missing = -len(samples) % unit
    return np.concatenate([samples, np.zeros(missing, np.float32)]) if missing else samples


class SpeechPieces:
    """The speech of one request, piece by piece, produced ahead of its consumer.

    For text, a thread synthesises sentence after sentence (at most two ahead)
    so TTS overlaps lip-sync and encoding. Iterating yields ``Speech``; a TTS
    error is raised at the piece where it happened.
    """

    _DONE = object()

    def __init__(self, count: int):
        self.count = max(1, count)
        self.tts_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def single(cls, speech: Speech) -> SpeechPieces:
        pieces = cls(1)
        pieces._queue.put(speech)
        pieces._queue.put(cls._DONE)
        return pieces

    @classmethod
    def synthesised(cls, tts, sentences: list[str], language: str, *,
                    max_seconds: float = math.inf) -> SpeechPieces:
        """``sentences`` spoken by ``tts``; once the speech so far lasts more than ``max_seconds``
        the piece that went over is a ``speech_too_long`` error and nothing more is synthesised."""
        pieces = cls(len(sentences))
        pieces._thread = threading.Thread(target=pieces._synthesise, args=(tts, sentences, language, max_seconds),
                                          name="tts-pieces", daemon=True)
        pieces._thread.start()
        return pieces

    def _synthesise(self, tts, sentences: list[str], language: str, max_seconds: float) -> None:
        spoken = 0
        seconds = 0.0
        silent: InvalidInputError | None = None
        for sentence in sentences:
            if self._stop.is_set():
                return
            t = time.perf_counter()
            try:
                item = tts.synthesize(sentence, language)
                spoken += 1
                seconds += item.duration
                check_speech_length(seconds, max_seconds)
            except InvalidInputError as exc:
                if exc.code != "empty_text":
                    item = exc
                else:  # a piece with nothing to say ("...", an emoji): skip it
                    silent = exc
                    continue
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = exc
            finally:
                self.tts_seconds += time.perf_counter() - t
            if not self._put(item) or isinstance(item, Exception):
                return
        self._put(self._DONE if spoken or silent is None else silent)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        """Stop synthesising (the consumer gave up or finished)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
