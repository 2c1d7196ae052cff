"""All configuration, read once from the environment into a frozen dataclass.

Nothing else in the project reads ``os.environ`` for settings: the web app
and the CLI build one ``Settings`` at start and pass it down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Mapping

ENGINES = ("auto", "wav2lip", "builtin")
TTS_PROVIDERS = ("auto", "espeak", "http")
DEVICES = ("auto", "cpu", "cuda")
FACE_DETECTORS = ("auto", "s3fd", "haar")
WAV2LIP_PRECISIONS = ("auto", "fp32", "fp16", "int8")
WAV2LIP_BACKENDS = ("auto", "torch", "onnxruntime")
LOG_FORMATS = ("json", "text")
RATE_LIMIT_OFF = ("", "off", "none", "0", "false", "no")


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    # --- server
    host: str = "0.0.0.0"
    port: int = 3000
    # --- avatar and faces
    avatar_path: str | None = None          # None: the built-in portrait
    face_detector: str = "auto"             # s3fd when its weights exist, else haar
    s3fd_path: str = "checkpoints/s3fd.pth"
    face_box: tuple[int, int, int, int] | None = None  # manual x1,y1,x2,y2 override
    cache_dir: str = ".cache"
    # --- lip-sync engine
    engine: str = "auto"                    # wav2lip when a checkpoint exists, else builtin
    checkpoint_path: str = "checkpoints/Wav2Lip-SD-GAN.pt"
    checkpoint_dir: str = "checkpoints"
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
    # --- video
    fps: int = 25
    max_output_height: int = 720
    x264_preset: str = "veryfast"
    x264_crf: int = 23
    x264_threads: int = 0                   # 0: ffmpeg's choice; fewer when several requests share the cores
    ffmpeg_timeout: float = 300.0
    output_dir: str = "outputs"
    # --- limits
    max_text_chars: int = 5000
    max_upload_bytes: int = 25 * 1024 * 1024
    max_audio_seconds: float = 300.0
    # --- jobs (asynchronous API)
    job_queue_size: int = 16                # queued jobs beyond this are refused with 429
    job_ttl_seconds: float = 24 * 3600.0    # finished results are deleted after this
    job_disk_cap_bytes: int = 2 * 1024**3   # oldest results go first above this
    webhook_secret: str | None = field(default=None, repr=False)  # HMAC-SHA256 key for callback signatures
    webhook_retries: int = 5
    webhook_timeout: float = 10.0
    # --- protection (README "Security")
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # API_KEYS, comma-separated; () = no auth
    rate_limit: str = "30/minute"           # POST /api/generate and /api/jobs per client; "off" disables
    rate_limit_read: str = "600/minute"     # the other protected /api routes (job status, video...) per client
    rate_limit_storage_uri: str = field(default="memory://", repr=False)  # or REDIS_URL; redis:// shares limits
    trusted_proxies: int = 0                # proxies in front that append to X-Forwarded-For
    cors_origins: tuple[str, ...] = ()      # CORS_ORIGINS, comma-separated; () = same-origin only
    max_image_pixels: int = 40_000_000      # avatar uploads above this (from the header) are refused
    max_sync_renders: int = 2               # POST /api/generate renders at once; more wait, then 503 busy
    sync_wait_seconds: float = 10.0         # how long a sync request waits for a render slot
    metrics_public: bool = False            # serve /metrics without an API key even when API_KEYS is set
    # --- operations (README "Operations")
    log_format: str = "json"                # json: one JSON object per line; text: human-readable
    log_level: str = "INFO"
    log_text: bool = False                  # put the request text (first 200 characters) in its log line
    shutdown_grace_seconds: float = 30.0    # on SIGTERM: time for the running job/renders to finish
    tts_breaker_failures: int = 5           # remote TTS: consecutive failed attempts that open the breaker
    tts_breaker_reset_seconds: float = 30.0  # ... and how long it stays open before one trial request

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from environment variables (names in README), then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            raw = env.get(_ENV_NAMES.get(f.name, f.name.upper()))
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(f.name, raw.strip())
        if "rate_limit_storage_uri" not in values and (env.get("REDIS_URL") or "").strip():
            values["rate_limit_storage_uri"] = env["REDIS_URL"].strip()
        settings = replace(cls(), **values, **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``SettingsError`` naming the first unusable value."""
        for name, allowed in (("engine", ENGINES), ("tts_provider", TTS_PROVIDERS),
                              ("device", DEVICES), ("face_detector", FACE_DETECTORS),
                              ("wav2lip_precision", WAV2LIP_PRECISIONS), ("wav2lip_backend", WAV2LIP_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.tts_provider == "http" and not self.tts_api_url:
            raise SettingsError("TTS_PROVIDER=http needs TTS_API_URL")
        for name in ("port", "batch_size", "fps", "max_output_height", "max_text_chars", "max_upload_bytes"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.tts_retries < 0 or self.tts_timeout <= 0:
            raise SettingsError("tts_retries must be >= 0 and tts_timeout > 0")
        for name in ("max_image_pixels", "max_sync_renders", "tts_breaker_failures"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        for name in ("trusted_proxies", "sync_wait_seconds", "shutdown_grace_seconds", "tts_breaker_reset_seconds"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        for name in ("rate_limit", "rate_limit_read"):
            parse_rate_limit(getattr(self, name), name)
        if self.rate_limit_storage_uri.split("://", 1)[0] not in ("memory", "redis", "rediss", "redis+unix",
                                                                    "redis+sentinel", "redis+cluster"):
            raise SettingsError("RATE_LIMIT_STORAGE_URI must be memory:// or a redis:// URL")
        for origin in self.cors_origins:
            if origin != "*" and not (origin.startswith(("http://", "https://")) and "/" not in origin.split("://", 1)[1]):
                raise SettingsError(f"CORS_ORIGINS: {origin!r} is not an origin like https://example.com")
        for key in self.api_keys:
            if not key or any(ch.isspace() for ch in key) or not key.isprintable():
                raise SettingsError("API_KEYS must be printable keys without spaces, separated by commas")

    @property
    def resolved_tts_provider(self) -> str:
        if self.tts_provider != "auto":
            return self.tts_provider
        return "http" if self.tts_api_url else "espeak"


def parse_rate_limit(spec: str, name: str = "rate_limit") -> list:
    """``spec`` ("30/minute", "5/second;100/hour") as ``limits`` items; [] when it says off."""
    if spec is None or spec.strip().lower() in RATE_LIMIT_OFF:
        return []
    from limits import parse_many

    try:
        return list(parse_many(spec))
    except ValueError:
        raise SettingsError(f"{name.upper()}={spec!r} is not a rate limit like '30/minute' or "
                            "'5/second;100/hour' (or 'off')") from None


# Fields whose environment name is not simply the upper-cased field name.
_ENV_NAMES = {
    "batch_size": "WAV2LIP_BATCH_SIZE",
    "max_upload_bytes": "MAX_UPLOAD_BYTES",
}


def _parse(name: str, raw: str):
    default = getattr(Settings(), name)
    kind = Settings.__dataclass_fields__[name].type
    try:
        if name == "face_box":
            parts = [int(p) for p in raw.replace(" ", ",").split(",") if p]
            if len(parts) != 4 or parts[0] >= parts[2] or parts[1] >= parts[3]:
                raise ValueError
            return tuple(parts)
        if name in ("api_keys", "cors_origins"):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int) or kind == "int":
            return int(raw)
        if isinstance(default, float) or kind == "float":
            return float(raw)
        return raw
    except ValueError:
        hint = "x1,y1,x2,y2 with x1 < x2 and y1 < y2" if name == "face_box" else f"a {type(default).__name__}"
        raise SettingsError(f"{_ENV_NAMES.get(name, name.upper())}={raw!r} is not {hint}") from None
