"""Every error the library and the server raise on purpose: one hierarchy.

Each carries a stable machine-readable ``code``, the HTTP ``status`` the server answers
with, and optionally ``retry_after`` (whole seconds, at least 1: the ``Retry-After`` header
and a JSON field) and other response ``headers``, so the server and the CLI report any of
them without knowing each case. Messages are plain English and never contain a traceback.

    LipsyncError (500 internal_error)
    ├── InvalidInputError      400  the request itself is wrong
    ├── PayloadTooLargeError   413  over a configured limit
    ├── NoFaceError            422  no face in the avatar
    ├── TTSError               502  the speech synthesiser failed
    │   ├── TTSTimeoutError        503  ... did not answer in time
    │   └── TTSUnavailableError    503  ... circuit breaker open (retry_after)
    ├── MediaError             500  ffmpeg failed on what we produced
    ├── CheckpointError        500  a model file cannot be used
    └── RefusedError           4xx/5xx  the service says "not now" (busy, queue full, rate
                                        limited, unauthorized, shutting down), usually with retry_after
"""

from __future__ import annotations


class LipsyncError(Exception):
    """Base class: ``code`` is stable across releases, ``status`` is HTTP."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 retry_after: float | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = None if retry_after is None else max(1, int(retry_after))
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        """The JSON body: ``{"error", "code"}`` plus ``retry_after`` when set."""
        data = {"error": self.message, "code": self.code}
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return data

    def response_headers(self) -> dict:
        """Extra response headers: ``headers`` plus ``Retry-After`` when set."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers


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


class TTSUnavailableError(TTSError):
    """The circuit breaker is open: the speech service failed repeatedly, so it is not called."""

    code = "tts_unavailable"
    status = 503


class MediaError(LipsyncError):
    """ffmpeg failed on something we produced (not the user's input)."""

    code = "media_error"
    status = 500


class CheckpointError(LipsyncError):
    """A model checkpoint could not be read or does not match the architecture."""

    code = "checkpoint_invalid"
    status = 500


class RefusedError(LipsyncError):
    """The service refuses for now (busy, queue full, rate limited, unauthorized, shutting down);
    ``code`` and ``status`` are always given, ``retry_after`` usually."""

    def __init__(self, message: str, *, code: str, status: int, retry_after: float | None = None,
                 headers: dict | None = None):
        super().__init__(message, code=code, status=status, retry_after=retry_after, headers=headers)


class QueueFullError(RefusedError):
    """``job_queue_size`` jobs already wait: HTTP 429, ``Retry-After: <retry_after>``."""

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message, code="queue_full", status=429, retry_after=retry_after)
