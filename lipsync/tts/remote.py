"""Speech from a self-hosted HTTP text-to-speech service.

Protocol: ``POST <url>`` with ``{"text": ..., "lang": "ru"|"kk"|"en"}`` as
JSON; the answer's body is the audio (MP3, WAV or anything else ffmpeg
decodes). The transport is ``requests`` (connection pooling, proxies from the
environment as before, redirects never followed); the attempts, their retries
and the breaker are this module's.

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
import http.cookiejar
import json
import logging
import math
import socket
import threading
import time
import urllib.parse

import requests
import requests.adapters
import requests.auth
import urllib3.exceptions

from lipsync.errors import InvalidInputError, TTSError, TTSTimeoutError, TTSUnavailableError
from lipsync.media.audio import SAMPLE_RATE, load_audio
from lipsync.tts.base import Speech
from lipsync.tts.espeak import validate_request

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024 * 1024
_CHUNK = 64 * 1024
# Content types that are certainly not audio: the service answered with an
# error page or an error document despite HTTP 200.
_NOT_AUDIO_TYPES = ("text/", "application/json", "application/problem+json", "application/xml",
                    "application/xhtml", "image/", "video/x-unknown")
_HEADERS = {"Content-Type": "application/json; charset=utf-8",
            "Accept": "audio/mpeg, audio/wav, audio/*;q=0.9, */*;q=0.1",
            "Accept-Encoding": "identity",  # the body as sent, as before (requests asks for gzip by default)
            "User-Agent": "lipsync-tts/1"}


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


class _AttemptTimeoutError(Exception):
    """One attempt ran out of time."""


class _RetryableError(Exception):
    """One attempt failed in a way that may pass: connection error or HTTP 5xx."""


class _RefusedError(TTSError):
    """The service answered and refused (HTTP 4xx, a redirect): it is up, not a breaker failure."""


class _BasicAuth(requests.auth.AuthBase):
    """The URL's credentials as an ``Authorization: Basic`` header (UTF-8; requests' own
    ``HTTPBasicAuth`` encodes Latin-1), or none. Always passed: with no ``auth`` requests
    would look for credentials in ``~/.netrc``, which urllib never did."""

    def __init__(self, header: str | None):
        self.header = header

    def __call__(self, request):
        if self.header:
            request.headers["Authorization"] = self.header
        return request


class _SystemTrustAdapter(requests.adapters.HTTPAdapter):
    """requests' transport adapter, verifying TLS certificates against the system's
    certificate authorities, as urllib did (an in-house TTS service often has a certificate
    from an in-house CA installed system-wide); requests alone trusts certifi's bundle only.
    A bundle named by ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` still replaces it."""

    def cert_verify(self, conn, url, verify, cert):
        super().cert_verify(conn, url, verify, cert)
        if verify is True:  # no bundle named: urllib3 then loads the system's default certificates
            conn.ca_certs = conn.ca_cert_dir = None


def _session() -> requests.Session:
    session = requests.Session()
    # No retries down there (requests' default, said aloud): each attempt is ours, since the
    # breaker counts attempts, timeouts are retried and a body that trickles in past the
    # deadline must end one (urllib3's Retry sees none of that).
    adapter = _SystemTrustAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))  # none kept, as before
    return session


class HttpTTS:
    """Client of a remote TTS endpoint. Thread-safe: calls share only a pool of connections
    (kept alive between calls) and the breaker.

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
        header = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self._auth = _BasicAuth(header)
        # Safe to show operators: no credentials, no query string.
        self.endpoint = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._session = _session()  # thread-safe as used here: a pool of connections, no cookies
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
            except _AttemptTimeoutError:
                healthy = False
                timeouts += 1
                last = f"no answer within {self.timeout:g} s"
            except _RetryableError as exc:
                healthy = False
                last = str(exc)
            except _RefusedError:
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
        """One request: (body, content type). Raises _AttemptTimeoutError, _RetryableError or TTSError."""
        deadline = time.monotonic() + self.timeout
        try:
            # timeout: for connecting and for each wait on the socket; the deadline bounds the rest
            with self._session.post(self._url, data=body, headers=_HEADERS, auth=self._auth, timeout=self.timeout,
                                    allow_redirects=False, stream=True) as response:
                status = response.status_code
                if not 200 <= status < 300:
                    detail = self._error_detail(response)
                    if status >= 500:
                        raise _RetryableError(f"it answered HTTP {status}{detail}")
                    if 300 <= status < 400:
                        # A redirect would re-send the Authorization header to wherever it points;
                        # report it instead (the operator should configure the final address).
                        raise _RefusedError(f"the speech service redirected the request (HTTP {status}); "
                                       "set TTS_API_URL to the final address")
                    raise _RefusedError(f"the speech service rejected the request: HTTP {status}{detail}")
                content_type = response.headers.get("Content-Type", "") or ""
                return self._read(response, deadline), content_type
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise _attempt_error(exc) from None

    def _read(self, response: requests.Response, deadline: float) -> bytes:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
            raise TTSError(f"the speech service's answer is too large ({int(length)} bytes)")
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise _AttemptTimeoutError()
            # read1: what has arrived (up to _CHUNK), so a body trickling in meets the deadline
            chunk = response.raw.read1(_CHUNK, decode_content=False)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise TTSError(f"the speech service's answer is too large (over {MAX_ANSWER_BYTES} bytes)")
            chunks.append(chunk)

    def _error_detail(self, response: requests.Response) -> str:
        """' <reason phrase>' for the message; the body (maybe a traceback) goes to the log."""
        try:
            raw = response.raw.read(2048, decode_content=False)
        except Exception:  # noqa: BLE001 - the body is optional
            raw = b""
        log.warning("speech service %s answered HTTP %s: %s", self.endpoint, response.status_code, _preview(raw))
        reason = response.reason.strip() if isinstance(response.reason, str) else ""
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


def _attempt_error(exc: BaseException) -> Exception:
    """What a failed request means for the attempt: ``_AttemptTimeoutError`` or ``_RetryableError`` with a message."""
    chain = _causes(exc)
    if isinstance(exc, requests.Timeout) or any(
            isinstance(e, (urllib3.exceptions.ReadTimeoutError, socket.timeout, TimeoutError)) for e in chain):
        return _AttemptTimeoutError()
    root = chain[-1]
    if any(isinstance(e, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.SSLError,
                          urllib3.exceptions.ProxyError)) for e in chain):
        return _RetryableError(f"could not connect to it ({_describe(root)})")
    if isinstance(root, http.client.HTTPException) and not isinstance(root, OSError):  # cut-off or malformed answer
        return _RetryableError(f"it sent a broken answer ({type(root).__name__})")
    return _RetryableError(f"the connection failed ({_describe(root)})")  # reset while reading, bad status line...


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first: requests wraps urllib3's errors, which wrap
    the socket's (as an argument, a ``reason`` or a ``__cause__``)."""
    chain = [exc]
    while len(chain) < 16:
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in reversed(exc.args) if isinstance(a, BaseException)), None)
        inner = inner or exc.__cause__ or exc.__context__
        if inner is None or inner in chain:
            break
        chain.append(inner)
        exc = inner
    return chain


def _describe(exc: BaseException) -> str:
    """The innermost error for a message: the operating system's words, never a URL (the
    messages of requests' and urllib3's own errors carry the query string)."""
    if type(exc).__module__.split(".")[0] in ("requests", "urllib3"):
        return type(exc).__name__
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.strip() or "unknown error"


def _preview(data: bytes) -> str:
    """The start of an answer body, for the log only (it may hold server internals)."""
    text = " ".join(data[:2048].decode("utf-8", "replace").split())
    return repr(text[:300]) if text else "(empty)"


__all__ = ["CircuitBreaker", "HttpTTS", "TTSUnavailableError"]
