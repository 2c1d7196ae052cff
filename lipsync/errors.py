"""Errors the pipeline raises on purpose.

Every error a user can cause or meet carries a stable machine-readable
``code`` and the HTTP status the web layer answers with, so the Flask app and
the CLI report them without knowing each case. Messages are plain English and
never contain a traceback.
"""


class LipsyncError(Exception):
    """Base class: ``code`` is stable across releases, ``status`` is HTTP."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        return {"error": self.message, "code": self.code}


class InvalidInputError(LipsyncError):
    """The request itself is wrong (empty text, unknown language, bad audio)."""

    code = "invalid_input"
    status = 400


class PayloadTooLargeError(LipsyncError):
    """Text or upload over a configured limit."""

    code = "payload_too_large"
    status = 413


class NoFaceError(LipsyncError):
    """No face was found in the avatar image."""

    code = "no_face"
    status = 422


class TTSError(LipsyncError):
    """The speech synthesiser failed (remote error, garbage answer)."""

    code = "tts_failed"
    status = 502


class TTSTimeoutError(TTSError):
    """The remote speech synthesiser did not answer in time."""

    code = "tts_timeout"
    status = 503


class MediaError(LipsyncError):
    """ffmpeg failed on something we produced (not the user's input)."""

    code = "media_error"
    status = 500


class CheckpointError(LipsyncError):
    """A model checkpoint could not be read or does not match the architecture."""

    code = "checkpoint_invalid"
    status = 500


class HttpError(LipsyncError):
    """A refusal of the server itself (busy, rate limited, unauthorized, shutting down), optionally
    with ``retry_after`` (whole seconds, at least 1: the ``Retry-After`` header and a JSON field)
    and other response ``headers``."""

    def __init__(self, message: str, *, code: str, status: int, retry_after: int | None = None,
                 headers: dict | None = None):
        super().__init__(message, code=code, status=status)
        self.retry_after = None if retry_after is None else max(1, int(retry_after))
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return data
