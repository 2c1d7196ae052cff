"""Speech from a self-hosted HTTP text-to-speech service.

Protocol: ``POST <url>`` with ``{"text": ..., "lang": "ru"|"kk"|"en"}`` as
JSON; the answer's body is the audio (MP3, WAV or anything else ffmpeg
decodes). Only the standard library is used.

Credentials in the URL (``https://user:secret@host/tts``) are sent as HTTP
Basic auth and never appear in messages or logs; neither does the query
string, which often carries API keys.

A circuit breaker guards the service: after ``breaker_failures`` failed
attempts in a row (connection errors, timeouts, HTTP 5xx, answers that are
not audio) it *opens* and every call fails at once with
``TTSUnavailableError`` (HTTP 503, code ``tts_unavailable``, with a
``retry_after``) instead of tying up a request thread for the timeout and
its retries. After ``breaker_reset`` seconds it is *half-open*: exactly one
call goes through as a trial; success closes the breaker, failure opens it
for another ``breaker_reset`` seconds. Calls arriving during the trial fail
fast too.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from lipsync.media.audio import SAMPLE_RATE, load_audio
from lipsync.errors import InvalidInputError, TTSError, TTSTimeoutError, TTSUnavailableError
from lipsync.tts.base import Speech
from lipsync.tts.espeak import validate_request

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024 * 1024
_CHUNK = 64 * 1024
# Content types that are certainly not audio: the service answered with an
# error page or an error document despite HTTP 200.
_NOT_AUDIO_TYPES = ("text/", "application/json", "application/problem+json", "application/xml",
                    "application/xhtml", "image/", "video/x-unknown")


class CircuitBreaker:
    """Closed -> (``failure_threshold`` failures in a row) -> open -> (``reset_timeout`` s) ->
    half-open: one trial call -> closed on success, open again on failure. Thread-safe.

    ``acquire()`` before each attempt (raises ``TTSUnavailableError`` when the
    call may not go out), then exactly one of ``success()`` / ``failure()`` /
    ``release()`` (the attempt ended in a way that says nothing about the
    service's health, e.g. our own error).
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 30.0, *, clock=time.monotonic):
        if failure_threshold < 1 or reset_timeout < 0:
            raise ValueError("failure_threshold must be >= 1 and reset_timeout >= 0")
        self.failure_threshold = int(failure_threshold)
        self.reset_timeout = float(reset_timeout)
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0           # consecutive failed attempts
        self._opened_at: float | None = None
        self._trial = False          # a half-open trial call is in flight
        self.opened_count = 0        # how often it opened (metrics, tests)

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return self.CLOSED
        if self._clock() - self._opened_at < self.reset_timeout:
            return self.OPEN
        return self.HALF_OPEN

    def check(self) -> None:
        """Raise ``TTSUnavailableError`` when a call would be refused now, without taking the
        half-open trial (callers check before starting expensive work around the call)."""
        with self._lock:
            state = self._state()
            if state == self.CLOSED or (state == self.HALF_OPEN and not self._trial):
                return
        if self.acquire():  # raises; or the state moved on meanwhile and this took the trial: give it back
            self.release()

    def acquire(self) -> bool:
        """Allow one attempt or raise ``TTSUnavailableError``. True when this attempt is the trial."""
        with self._lock:
            state = self._state()
            if state == self.CLOSED:
                return False
            if state == self.HALF_OPEN and not self._trial:
                self._trial = True
                return True
            if state == self.OPEN:
                wait = self.reset_timeout - (self._clock() - self._opened_at)
            else:  # half-open with a trial in flight: its outcome decides soon
                wait = 1.0
        raise TTSUnavailableError(
            f"the speech service is unavailable after {self.failure_threshold} failed attempts in a row; "
            f"retry in {math.ceil(wait)} s", retry_after=math.ceil(wait))

    def success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                log.warning("speech service circuit closed: the service answers again")
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            trial, self._trial = self._trial, False
            if trial or (self._opened_at is None and self._failures >= self.failure_threshold):
                self._opened_at = self._clock()
                self.opened_count += 1
                log.warning("speech service circuit open for %g s after %d failed attempt(s)",
                            self.reset_timeout, self._failures)

    def release(self) -> None:
        with self._lock:
            self._trial = False


class _Timeout(Exception):
    """One attempt ran out of time."""


class _Retryable(Exception):
    """One attempt failed in a way that may pass: connection error or HTTP 5xx."""


class _Refused(TTSError):
    """The service answered and refused (HTTP 4xx, a redirect): it is up, not a breaker failure."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would re-send the Authorization header to wherever it points;
    # report it instead (the operator should configure the final address).
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class HttpTTS:
    """Client of a remote TTS endpoint. Stateless per call, so thread-safe.

    ``timeout`` bounds each attempt (connecting, waiting and downloading);
    ``retries`` extra attempts follow a connection error, a timeout or an HTTP
    5xx, after ``backoff``, ``2*backoff``, ``4*backoff`` ... seconds. An HTTP
    4xx is not retried.
    """

    name = "http"

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5, *,
                 breaker_failures: int = 5, breaker_reset: float = 30.0):
        parts = urllib.parse.urlsplit(url.strip() if isinstance(url, str) else "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the TTS URL must be an http:// or https:// address")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("timeout must be > 0, retries and backoff >= 0")
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the TTS URL has an invalid port") from None
        if port is not None:
            netloc += f":{port}"
        self._url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        self._auth: str | None = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        # Safe to show operators: no credentials, no query string.
        self.endpoint = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._opener = urllib.request.build_opener(_NoRedirect())
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset)

    def __repr__(self) -> str:
        return f"HttpTTS({self.endpoint!r}, timeout={self.timeout}, retries={self.retries})"

    def synthesize(self, text: str, language: str) -> Speech:
        text, language = validate_request(text, language)
        body = json.dumps({"text": text, "lang": language}, ensure_ascii=False).encode("utf-8")
        attempts = self.retries + 1
        timeouts = 0
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.breaker.acquire()  # raises TTSUnavailableError while the breaker is open
            healthy = None  # True/False once the attempt said something about the service
            try:
                audio_bytes, content_type = self._post(body)
                healthy = False  # until the answer proves to be audio
                speech = self._decode(audio_bytes, content_type)
                healthy = True
                return speech
            except _Timeout:
                healthy = False
                timeouts += 1
                last = f"no answer within {self.timeout:g} s"
            except _Retryable as exc:
                healthy = False
                last = str(exc)
            except _Refused:
                healthy = True  # a 4xx or a redirect: the service is up and said no
                raise
            except TTSError:
                healthy = False  # an answer that is not audio, or far too large: it misbehaves
                raise
            finally:
                if healthy is True:
                    self.breaker.success()
                elif healthy is False:
                    self.breaker.failure()
                else:
                    self.breaker.release()
            log.warning("speech service %s, attempt %d of %d: %s", self.endpoint, attempt + 1, attempts, last)
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if timeouts == attempts:
            raise TTSTimeoutError(f"the speech service did not answer within {self.timeout:g} s ({tries})")
        raise TTSError(f"the speech service failed after {tries}: {last}")

    # ------------------------------------------------------------- one attempt
    def _post(self, body: bytes) -> tuple[bytes, str]:
        """One request: (body, content type). Raises _Timeout, _Retryable or TTSError."""
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "Accept": "audio/mpeg, audio/wav, audio/*;q=0.9, */*;q=0.1",
                   "User-Agent": "lipsync-tts/1"}
        if self._auth:
            headers["Authorization"] = self._auth
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                content_type = response.headers.get("Content-Type", "") or ""
                return self._read(response, deadline), content_type
        except urllib.error.HTTPError as exc:
            status = exc.code
            detail = self._error_detail(exc)
            if status >= 500:
                raise _Retryable(f"it answered HTTP {status}{detail}") from None
            if 300 <= status < 400:
                raise _Refused(f"the speech service redirected the request (HTTP {status}); "
                               "set TTS_API_URL to the final address") from None
            raise _Refused(f"the speech service rejected the request: HTTP {status}{detail}") from None
        except (socket.timeout, TimeoutError):
            raise _Timeout() from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Timeout() from None
            raise _Retryable(f"could not connect to it ({_describe(reason)})") from None
        except (ConnectionError, OSError) as exc:  # reset while reading, bad status line...
            raise _Retryable(f"the connection failed ({_describe(exc)})") from None
        except http.client.HTTPException as exc:  # cut-off or malformed answer
            raise _Retryable(f"it sent a broken answer ({type(exc).__name__})") from None

    def _read(self, response, deadline: float) -> bytes:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
            raise TTSError(f"the speech service's answer is too large ({int(length)} bytes)")
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise _Timeout()
            chunk = response.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise TTSError(f"the speech service's answer is too large (over {MAX_ANSWER_BYTES} bytes)")
            chunks.append(chunk)

    def _error_detail(self, exc: urllib.error.HTTPError) -> str:
        """' <reason phrase>' for the message; the body (maybe a traceback) goes to the log."""
        try:
            raw = exc.read(2048)
        except Exception:  # noqa: BLE001 - the body is optional
            raw = b""
        finally:
            exc.close()
        log.warning("speech service %s answered HTTP %s: %s", self.endpoint, exc.code, _preview(raw))
        reason = exc.reason.strip() if isinstance(exc.reason, str) else ""
        return f" {reason}" if reason else ""

    @staticmethod
    def _decode(data: bytes, content_type: str) -> Speech:
        media = content_type.split(";", 1)[0].strip().lower()
        what = f"{media or 'no content type'}, {len(data)} bytes"
        if not data:
            raise TTSError("the speech service answered with an empty body instead of audio")
        if media.startswith(_NOT_AUDIO_TYPES) or data.lstrip()[:1] in (b"<", b"{", b"["):
            log.warning("speech service answered HTTP 200 with %s: %s", what, _preview(data))
            raise TTSError(f"the speech service's answer was not audio ({what})")
        try:
            samples = load_audio(data)
        except InvalidInputError:
            log.warning("speech service answered HTTP 200 with undecodable %s: %s", what, _preview(data))
            raise TTSError(f"the speech service's answer was not audio ({what})") from None
        return Speech(samples=samples, sample_rate=SAMPLE_RATE)


def _describe(reason) -> str:
    if isinstance(reason, BaseException):
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    else:
        text = str(reason)
    return text.strip() or "unknown error"


def _preview(data: bytes) -> str:
    """The start of an answer body, for the log only (it may hold server internals)."""
    text = " ".join(data[:2048].decode("utf-8", "replace").split())
    return repr(text[:300]) if text else "(empty)"


__all__ = ["CircuitBreaker", "HttpTTS", "TTSUnavailableError"]
