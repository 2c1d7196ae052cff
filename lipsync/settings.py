"""The pipeline's configuration, read once from the environment into a frozen dataclass.

``Settings`` holds what the library needs (avatar, faces, engine, speech, video, limits,
jobs); the HTTP server's own settings (listening address, API keys, rate limits, CORS,
logging, shutdown) are ``lipsync.server.settings.ServerSettings``, read the same way.
Entry points (the CLI, the web app, gunicorn's config, the worker) build them once and pass
them down; no other module reads ``os.environ`` for a setting. (The only other environment
variable looked at is glibc's own ``MALLOC_ARENA_MAX``, which ``tune_malloc`` respects.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

ENGINES = ("auto", "wav2lip", "builtin")
TTS_PROVIDERS = ("auto", "espeak", "http")
DEVICES = ("auto", "cpu", "cuda")
FACE_DETECTORS = ("auto", "s3fd", "haar")
WAV2LIP_PRECISIONS = ("auto", "fp32", "fp16", "int8")
WAV2LIP_BACKENDS = ("auto", "torch", "onnxruntime")
VIDEO_ENCODERS = ("auto", "x264", "openh264")


# MAX_OUTPUT_HEIGHT=0: the default output height limit on a CPU-only machine (speed: README) and
# where frames are made on a GPU (photos: their own size up to max_output_pixels; video avatars).
CPU_OUTPUT_HEIGHT = 720
GPU_OUTPUT_HEIGHT = 2160
GPU_VIDEO_HEIGHT = 1080
# ENCODE_WORKERS=0: segment-parallel encoding on machines with this many cores or more, each
# segment's encoder on this many threads (docs/PERFORMANCE.md, "Issue 14": x264 is fastest as 8
# segments x 2 threads on 16 cores, openh264, which threads only across slices, as 16 x 1).
SEGMENTED_MIN_CORES = 8
SEGMENT_THREADS = {"x264": 2, "openh264": 1}


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


class EnvSettings:
    """``from_env`` for a frozen settings dataclass: each field from the upper-cased field name
    (or ``ENV_NAMES``), parsed to the field's type, then ``validate()``d."""

    ENV_NAMES: ClassVar[dict[str, str]] = {}
    LIST_FIELDS: ClassVar[frozenset[str]] = frozenset()  # comma-separated tuples of strings
    FIELD_HINTS: ClassVar[dict[str, str]] = {}  # what a field's value must look like, for the error

    @classmethod
    def env_name(cls, name: str) -> str:
        return cls.ENV_NAMES.get(name, name.upper())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides):
        """Settings from environment variables (names in README), then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            raw = env.get(cls.env_name(f.name))
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = cls._parse(f.name, raw.strip())
        values.update(cls._fallbacks(env, values))
        settings = replace(cls(), **values, **overrides)
        settings.validate()
        return settings

    @classmethod
    def _fallbacks(cls, env: Mapping[str, str], values: dict) -> dict:
        """Values taken from another variable when a field's own is unset."""
        return {}

    @classmethod
    def _parse_special(cls, name: str, raw: str) -> Any:
        """A field with its own syntax: return its value, or None to parse it by type."""
        return None

    @classmethod
    def _parse(cls, name: str, raw: str):
        default = getattr(cls(), name)
        kind = cls.__dataclass_fields__[name].type
        try:
            special = cls._parse_special(name, raw)
            if special is not None:
                return special
            if name in cls.LIST_FIELDS:
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            if isinstance(default, bool):
                return raw.lower() in ("1", "true", "yes", "on")
            if isinstance(default, int) or kind == "int":
                return int(raw)
            if isinstance(default, float) or kind == "float":
                return float(raw)
            return raw
        except ValueError:
            hint = cls.FIELD_HINTS.get(name) or f"a {type(default).__name__}"
            raise SettingsError(f"{cls.env_name(name)}={raw!r} is not {hint}") from None

    def validate(self) -> None:  # pragma: no cover - each subclass checks its own fields
        raise NotImplementedError

    def check_choices(self, choices: Mapping[str, tuple[str, ...]]) -> None:
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")

    def check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")

    def check_non_negative(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0")


@dataclass(frozen=True)
class Settings(EnvSettings):
    # --- avatar and faces
    avatar_path: str | None = None          # None: the built-in portrait
    face_detector: str = "auto"             # s3fd when its weights exist, else haar
    s3fd_path: str = "checkpoints/s3fd.pth"
    face_box: tuple[int, int, int, int] | None = None  # manual x1,y1,x2,y2 override
    cache_dir: str = ".cache"
    avatars_dir: str = ""                   # the avatar library; "" = <output_dir>/avatars
    max_avatars: int = 100                  # library entries per API key (or in all, without keys)
    max_avatar_seconds: float = 60.0        # longest video avatar (413 video_too_long)
    idle_motion: bool = True                # blinks, head sway, breathing on image avatars (per request too)
    # --- live sessions (README "Live conversation")
    max_sessions: int = 2                   # open at once per process (each also holds a render slot)
    session_idle_seconds: float = 120.0     # without a client message, while nothing is said: the session ends
    session_max_seconds: float = 3600.0     # the longest session
    # --- lip-sync engine
    engine: str = "auto"                    # wav2lip when a checkpoint exists, else builtin
    checkpoint_path: str = "checkpoints/Wav2Lip-SD-GAN.pt"
    checkpoint_dir: str = "checkpoints"     # CHECKPOINTS_DIR (or CHECKPOINT_DIR): every checkpoint is a model
    default_model: str = ""                 # a model's name (file stem or "builtin"); "": see engines/models.py
    device: str = "auto"
    batch_size: int = 64
    wav2lip_precision: str = "auto"         # fp16 on CUDA, fp32 on CPU; int8: opt-in CPU quantisation
    wav2lip_backend: str = "auto"           # onnxruntime on CPU when installed, else torch
    wav2lip_mouth_only: bool = True         # compute only the rows the blend mask shows (same frames)
    # --- speech
    tts_provider: str = "auto"              # http when TTS_API_URL is set, else espeak
    tts_api_url: str | None = None
    tts_timeout: float = 30.0               # seconds per attempt
    tts_retries: int = 2                    # extra attempts after the first
    tts_breaker_failures: int = 5           # remote TTS: consecutive failed attempts that open the breaker
    tts_breaker_reset_seconds: float = 30.0  # ... and how long it stays open before one trial request
    # --- video
    fps: int = 25
    max_output_height: int = 0              # 0: auto (720 lines on a CPU; on a GPU the avatar's size, see below)
    max_output_pixels: int = 2_100_000      # the output frame's area at most (a 1080p-class frame)
    video_encoder: str = "auto"             # openh264 where ffmpeg has it (less than half x264's CPU), else x264
    x264_preset: str = "veryfast"
    x264_crf: int = 23                      # x264's CRF; openh264's fixed quantiser (the same SSIM)
    x264_threads: int = 0                   # 0: ffmpeg's choice; fewer when several requests share the cores
    encode_workers: int = 0                 # encoder processes on one video's segments; 0: auto, 1: one stream
    ffmpeg_timeout: float = 300.0
    ffmpeg_binary: str | None = None        # None: the system ffmpeg, else the pip-bundled one
    output_dir: str = "outputs"
    # --- limits
    max_text_chars: int = 5000
    max_upload_bytes: int = 25 * 1024 * 1024
    max_audio_seconds: float = 300.0
    max_speech_seconds: float = 300.0       # longest speech synthesised from a text (413 speech_too_long)
    max_image_pixels: int = 40_000_000      # avatar images above this (from the header) are refused
    # --- jobs (asynchronous API)
    job_queue_size: int = 16                # queued jobs beyond this are refused with 429
    job_ttl_seconds: float = 24 * 3600.0    # finished results are deleted after this
    job_disk_cap_bytes: int = 2 * 1024**3   # oldest results go first above this
    webhook_secret: str | None = field(default=None, repr=False)  # HMAC-SHA256 key for callback signatures
    webhook_retries: int = 5
    webhook_timeout: float = 10.0
    # --- cluster (README "Cluster"): jobs in Redis, rendered by `python -m lipsync worker` processes
    queue_url: str | None = field(default=None, repr=False)  # redis://host:port/db; unset: the embedded queue
    job_max_attempts: int = 3               # runs of a job whose worker died (SIGKILL, lost machine), then worker_lost
    worker_heartbeat_seconds: float = 5.0   # a busy worker's heartbeat; 3 missed: its job goes to another worker
    job_timeout_seconds: float = 3600.0     # a cluster job running longer is stopped (failed, job_timeout)

    # Fields whose environment name is not simply the upper-cased field name.
    ENV_NAMES: ClassVar[dict[str, str]] = {"batch_size": "WAV2LIP_BATCH_SIZE", "checkpoint_dir": "CHECKPOINTS_DIR"}
    FIELD_HINTS: ClassVar[dict[str, str]] = {"face_box": "x1,y1,x2,y2 with x1 < x2 and y1 < y2"}

    @classmethod
    def _fallbacks(cls, env: Mapping[str, str], values: dict) -> dict:
        legacy = (env.get("CHECKPOINT_DIR") or "").strip()  # the name before several models existed
        return {"checkpoint_dir": legacy} if legacy and "checkpoint_dir" not in values else {}

    @classmethod
    def _parse_special(cls, name: str, raw: str):
        if name != "face_box":
            return None
        parts = [int(p) for p in raw.replace(" ", ",").split(",") if p]
        if len(parts) != 4 or parts[0] >= parts[2] or parts[1] >= parts[3]:
            raise ValueError(raw)
        return tuple(parts)

    def validate(self) -> None:
        """Raise ``SettingsError`` naming the first unusable value."""
        self.check_choices({"engine": ENGINES, "tts_provider": TTS_PROVIDERS, "device": DEVICES,
                            "face_detector": FACE_DETECTORS, "wav2lip_precision": WAV2LIP_PRECISIONS,
                            "wav2lip_backend": WAV2LIP_BACKENDS, "video_encoder": VIDEO_ENCODERS})
        if self.tts_provider == "http" and not self.tts_api_url:
            raise SettingsError("TTS_PROVIDER=http needs TTS_API_URL")
        self.check_positive("batch_size", "fps", "max_output_pixels", "max_text_chars", "max_upload_bytes")
        if self.tts_retries < 0 or self.tts_timeout <= 0:
            raise SettingsError("tts_retries must be >= 0 and tts_timeout > 0")
        self.check_positive("max_image_pixels", "tts_breaker_failures", "max_speech_seconds", "max_avatars",
                            "max_avatar_seconds", "max_sessions", "session_idle_seconds", "session_max_seconds")
        self.check_non_negative("tts_breaker_reset_seconds", "encode_workers", "x264_threads", "max_output_height")
        self.check_positive("job_max_attempts", "worker_heartbeat_seconds", "job_timeout_seconds")
        if self.queue_url and self.queue_url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise SettingsError("QUEUE_URL must be a redis://, rediss:// or unix:// URL (or unset: the embedded queue)")

    def output_height(self, gpu: bool, *, video: bool = False) -> int:
        """The output's height limit: ``MAX_OUTPUT_HEIGHT``, or by default ``CPU_OUTPUT_HEIGHT``
        on a CPU-only machine and ``GPU_OUTPUT_HEIGHT`` (photos; ``GPU_VIDEO_HEIGHT`` for video
        avatars) where frames are made on a GPU. ``max_output_pixels`` caps the area too."""
        if self.max_output_height:
            return self.max_output_height
        if not gpu:
            return CPU_OUTPUT_HEIGHT
        return GPU_VIDEO_HEIGHT if video else GPU_OUTPUT_HEIGHT

    def encode_layout(self, encoder: str = "x264", cores: int | None = None) -> tuple[int, int]:
        """(segments encoded at once, encoder threads each) for one video with ``encoder``
        (``lipsync.media.segments``); (1, ``x264_threads``): one stream. Auto (``ENCODE_WORKERS=0``):
        on machines of at least ``SEGMENTED_MIN_CORES`` cores one segment per ``SEGMENT_THREADS``
        cores, else one stream."""
        cores = cores or os.cpu_count() or 1
        per_segment = SEGMENT_THREADS.get(encoder, 1)
        workers = self.encode_workers
        if workers == 0:
            workers = cores // per_segment if cores >= SEGMENTED_MIN_CORES else 1
        if workers <= 1:
            return 1, self.x264_threads
        return workers, self.x264_threads or per_segment

    @property
    def resolved_avatars_dir(self) -> str:
        return self.avatars_dir or os.path.join(self.output_dir, "avatars")

    @property
    def resolved_tts_provider(self) -> str:
        if self.tts_provider != "auto":
            return self.tts_provider
        return "http" if self.tts_api_url else "espeak"
