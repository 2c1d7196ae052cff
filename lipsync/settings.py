"""All configuration, read once from the environment into a frozen dataclass.

Nothing else in the project reads ``os.environ`` for settings: the web app
and the CLI build one ``Settings`` at start and pass it down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Mapping

ENGINES = ("auto", "wav2lip", "builtin")
TTS_PROVIDERS = ("auto", "espeak", "http")
DEVICES = ("auto", "cpu", "cuda")
FACE_DETECTORS = ("auto", "s3fd", "haar")


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
    webhook_secret: str | None = None       # HMAC-SHA256 key for callback signatures
    webhook_retries: int = 5
    webhook_timeout: float = 10.0

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
        settings = replace(cls(), **values, **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``SettingsError`` naming the first unusable value."""
        for name, allowed in (("engine", ENGINES), ("tts_provider", TTS_PROVIDERS),
                              ("device", DEVICES), ("face_detector", FACE_DETECTORS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.tts_provider == "http" and not self.tts_api_url:
            raise SettingsError("TTS_PROVIDER=http needs TTS_API_URL")
        for name in ("port", "batch_size", "fps", "max_output_height", "max_text_chars", "max_upload_bytes"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.tts_retries < 0 or self.tts_timeout <= 0:
            raise SettingsError("tts_retries must be >= 0 and tts_timeout > 0")

    @property
    def resolved_tts_provider(self) -> str:
        if self.tts_provider != "auto":
            return self.tts_provider
        return "http" if self.tts_api_url else "espeak"


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
