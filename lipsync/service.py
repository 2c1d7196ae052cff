"""The whole pipeline behind one object, shared by the web app and the CLI.

``LipsyncService.load()`` does the slow work once (avatar, face box, engine,
TTS voice); ``generate()`` then turns text or a recording into an MP4:

    text -> TTS -> 16 kHz speech -> engine patches -> composite -> ffmpeg MP4
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from lipsync import audio, video
from lipsync.engines.base import Engine, PreparedAvatar
from lipsync.errors import CheckpointError, InvalidInputError, LipsyncError, PayloadTooLargeError
from lipsync.settings import Settings
from lipsync.tts.base import LANGUAGES, Speech

log = logging.getLogger("lipsync")

# progress(stage, fraction): stage is one of STAGES, fraction in [0, 1]
ProgressCallback = Callable[[str, float], None]
STAGES = ("tts", "audio", "lipsync", "encode")


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced: the MP4 at ``path`` and how long each stage took (ms)."""

    path: str
    duration: float          # seconds of speech (and video)
    frames: int
    engine: str
    timings: dict[str, float] = field(default_factory=dict)


def default_avatar() -> np.ndarray:
    """The built-in avatar: scikit-image's public-domain ``astronaut`` portrait, BGR."""
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def find_checkpoint(settings: Settings) -> str | None:
    """The Wav2Lip checkpoint to use: ``CHECKPOINT_PATH``, else any .pt/.pth in the checkpoint folder.

    S3FD face-detector weights living in the same folder are not candidates.
    """
    if os.path.isfile(settings.checkpoint_path):
        return settings.checkpoint_path
    found = sorted(glob.glob(os.path.join(settings.checkpoint_dir, "*.pt")) +
                   glob.glob(os.path.join(settings.checkpoint_dir, "*.pth")))
    found = [p for p in found if "s3fd" not in os.path.basename(p).lower()
             and os.path.abspath(p) != os.path.abspath(settings.s3fd_path)]
    return found[0] if found else None


def create_engine(settings: Settings) -> Engine:
    """Wav2Lip when a checkpoint exists (or is demanded), otherwise the built-in engine."""
    if settings.engine != "builtin":
        checkpoint = find_checkpoint(settings)
        if checkpoint is not None:
            from lipsync.engines.wav2lip import Wav2LipEngine  # imports torch: only when needed

            return Wav2LipEngine(checkpoint, device=settings.device, batch_size=settings.batch_size)
        if settings.engine == "wav2lip":
            raise CheckpointError(f"ENGINE=wav2lip but no checkpoint at {settings.checkpoint_path} "
                                  f"and no .pt/.pth file in {settings.checkpoint_dir}/")
    from lipsync.engines.builtin import BuiltinEngine

    return BuiltinEngine()


class LipsyncService:
    """Preloaded resources plus the request pipeline. Thread-safe after ``load()``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.status = "loading"          # loading | ready | error
        self.error: str | None = None
        self.engine: Engine | None = None
        self.tts = None
        self.faces = None
        self.avatar: PreparedAvatar | None = None
        self._avatar_jpeg: bytes | None = None
        self._ready = threading.Event()

    # ----------------------------------------------------------------- loading
    def load(self) -> "LipsyncService":
        """Load avatar, face box, engine and TTS voice. Sets ``status``; never raises."""
        from lipsync.faces import FaceLocator
        from lipsync.tts import create_provider

        started = time.perf_counter()
        try:
            s = self.settings
            self.tts = create_provider(s)
            self.faces = FaceLocator(detector=s.face_detector, s3fd_path=s.s3fd_path, device=s.device,
                                     cache_dir=s.cache_dir, box_override=s.face_box)
            self.engine = create_engine(s)
            image = self._read_avatar_file(s.avatar_path) if s.avatar_path else default_avatar()
            self.avatar = self.prepare_avatar(image)
            ok, jpeg = cv2.imencode(".jpg", self.avatar.image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            self._avatar_jpeg = jpeg.tobytes()
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
    def _read_avatar_file(path: str) -> np.ndarray:
        try:
            with open(path, "rb") as f:
                return video.decode_image(f.read())
        except OSError as exc:
            raise InvalidInputError(f"cannot read the avatar image {path}: {exc.strerror}",
                                    code="invalid_image") from None

    def prepare_avatar(self, image: np.ndarray) -> PreparedAvatar:
        """Scale an avatar to output size, find its face (cached) and let the engine prepare it."""
        # Detect (and cache, and apply FACE_BOX) on the image as the user gave
        # it, then scale the box with the image to output size.
        box = self.faces.locate(image)
        scaled = video.fit_to_height(image, self.settings.max_output_height)
        box = box.scaled(scaled.shape[0] / image.shape[0]).clip(scaled.shape[1], scaled.shape[0])
        return self.engine.prepare(scaled, box)

    def describe(self) -> dict:
        """Health details: engine, checkpoint, device, TTS provider, face detector."""
        info = {"status": self.status, "models_loaded": self.engine is not None and self.tts is not None,
                "avatar_loaded": self.avatar is not None}
        if self.engine is not None:
            info.update(self.engine.describe())
        else:
            info.update({"engine": None, "checkpoint": None, "version": None, "device": None})
        info["tts_provider"] = getattr(self.tts, "name", None)
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
    def validate_text(self, text, language) -> tuple[str, str]:
        """Check a text request; returns (text, language) or raises a 4xx ``LipsyncError``."""
        if not isinstance(text, str):
            raise InvalidInputError("'text' must be a string", code="invalid_text")
        if not text.strip():
            raise InvalidInputError("'text' is empty", code="empty_text")
        if len(text) > self.settings.max_text_chars:
            raise PayloadTooLargeError(f"'text' has {len(text)} characters; the limit is "
                                       f"{self.settings.max_text_chars}", code="text_too_long")
        if not isinstance(language, str) or language not in LANGUAGES:
            raise InvalidInputError(f"'language' must be one of {', '.join(LANGUAGES)}",
                                    code="unsupported_language")
        return text, language

    def speech_from_recording(self, data: bytes) -> Speech:
        """Decode an uploaded recording (any format ffmpeg reads) into 16 kHz speech."""
        if len(data) > self.settings.max_upload_bytes:
            raise PayloadTooLargeError(f"the upload is {len(data)} bytes; the limit is "
                                       f"{self.settings.max_upload_bytes}", code="upload_too_large")
        if not data:
            raise InvalidInputError("the audio file is empty", code="invalid_audio")
        samples = audio.load_audio(data, timeout=self.settings.ffmpeg_timeout)
        seconds = len(samples) / audio.SAMPLE_RATE
        if seconds > self.settings.max_audio_seconds:
            raise PayloadTooLargeError(f"the audio lasts {seconds:.0f} s; the limit is "
                                       f"{self.settings.max_audio_seconds:.0f} s", code="audio_too_long")
        return Speech(samples=samples)

    # -------------------------------------------------------------- pipeline
    def generate(self, out_path: str, *, text: str | None = None, language: str | None = None,
                 recording: bytes | None = None, avatar_image: bytes | None = None,
                 progress: ProgressCallback | None = None) -> GenerationResult:
        """Make the MP4 at ``out_path`` from ``text`` (+ ``language``) or a ``recording``.

        ``avatar_image`` optionally replaces the preloaded avatar for this
        request only. Raises ``LipsyncError`` subclasses for bad input; on any
        failure nothing is left at ``out_path``.
        """
        if self.status != "ready":
            raise LipsyncError(f"the service is not ready ({self.status})", code="not_ready", status=503)
        report = progress or (lambda stage, fraction: None)
        timings: dict[str, float] = {}
        started = time.perf_counter()

        if recording is None:
            text, language = self.validate_text(text, language)
        avatar = self.avatar
        if avatar_image is not None:
            avatar = self.prepare_avatar(video.decode_image(avatar_image))
            timings["avatar"] = _ms_since(started)

        t = time.perf_counter()
        report("tts", 0.0)
        if recording is not None:
            speech = self.speech_from_recording(recording)
            timings["decode"] = _ms_since(t)
        else:
            speech = self.tts.synthesize(text, language)
            timings["tts"] = _ms_since(t)
        report("tts", 1.0)

        work_dir = tempfile.mkdtemp(prefix="req-", dir=self.temp_root())
        try:
            result = self._render(speech, avatar, out_path, work_dir, timings, report)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        timings["total"] = _ms_since(started)
        return GenerationResult(path=out_path, duration=speech.duration, frames=result,
                                engine=self.engine.name, timings=timings)

    def _render(self, speech: Speech, avatar: PreparedAvatar, out_path: str, work_dir: str,
                timings: dict[str, float], report: ProgressCallback) -> int:
        fps = self.settings.fps
        t = time.perf_counter()
        wav_path = os.path.join(work_dir, "speech.wav")
        audio.write_wav(wav_path, speech.samples, speech.sample_rate)
        timings["audio"] = _ms_since(t)

        total = audio.frame_count(len(speech.samples), fps)
        height, width = avatar.image.shape[:2]
        engine_seconds = composite_seconds = 0.0
        with video.Mp4Writer(out_path, width, height, fps, wav_path, preset=self.settings.x264_preset,
                             crf=self.settings.x264_crf, timeout=self.settings.ffmpeg_timeout) as writer:
            patches = self.engine.render(avatar, speech, fps)
            while True:
                t = time.perf_counter()
                batch = next(patches, None)
                engine_seconds += time.perf_counter() - t
                if batch is None:
                    break
                t = time.perf_counter()
                encode_before = writer.encode_seconds
                for frame in video.composite(avatar, [batch]):
                    writer.write(frame)
                composite_seconds += time.perf_counter() - t - (writer.encode_seconds - encode_before)
                report("lipsync", min(1.0, writer.frames / max(1, total)))
            if writer.frames != total:  # inside the block: the writer then discards the file
                raise LipsyncError(f"the engine produced {writer.frames} frames, expected {total}")
            report("encode", 0.0)
        report("encode", 1.0)
        timings["lipsync"] = engine_seconds * 1000.0
        timings["composite"] = composite_seconds * 1000.0
        timings["encode"] = writer.encode_seconds * 1000.0
        return writer.frames

    def temp_root(self) -> str:
        """Folder for per-request working files (removed after each request)."""
        root = os.path.join(self.settings.output_dir, "tmp")
        os.makedirs(root, exist_ok=True)
        return root


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
