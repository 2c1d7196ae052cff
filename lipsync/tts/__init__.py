"""Text to speech: the providers and the factory that picks one from Settings.

``espeak`` (default) runs libespeak-ng in-process, offline; ``http`` calls a
self-hosted TTS service (``TTS_API_URL``). Both return ``Speech`` at 16 kHz.
"""

from __future__ import annotations

from lipsync.settings import SettingsError
from lipsync.tts.base import LANGUAGES, PhonemeEvent, Speech, TTSProvider


def create_provider(settings) -> TTSProvider:
    """The provider ``settings.resolved_tts_provider`` names, ready to use.

    The espeak provider is initialised here, so a missing library or voice
    shows up at start-up (``TTSError``) rather than on the first request. The
    HTTP provider is not contacted: the service may start later than we do.
    """
    kind = settings.resolved_tts_provider
    if kind == "espeak":
        from lipsync.tts.espeak import EspeakTTS
        return EspeakTTS().load()
    if kind == "http":
        from lipsync.tts.remote import HttpTTS
        if not settings.tts_api_url:
            raise SettingsError("TTS_PROVIDER=http needs TTS_API_URL")
        try:
            return HttpTTS(settings.tts_api_url, timeout=settings.tts_timeout, retries=settings.tts_retries,
                           breaker_failures=settings.tts_breaker_failures,
                           breaker_reset=settings.tts_breaker_reset_seconds)
        except ValueError as exc:
            raise SettingsError(f"TTS_API_URL: {exc}") from None
    raise SettingsError(f"unknown TTS provider {kind!r}")


__all__ = ["create_provider", "Speech", "PhonemeEvent", "LANGUAGES", "TTSProvider"]
