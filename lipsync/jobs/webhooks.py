"""Signed webhook deliveries for finished jobs.

When a job that was submitted with a ``callback_url`` ends (``done``,
``failed`` or ``cancelled``), the service POSTs the job's final state, the
same JSON object ``GET /api/jobs/<id>`` returns (its ``status_url`` and other
links come from the ``job_links`` function the web layer gives the queue), to
that URL::

    POST <callback_url>
    Content-Type: application/json
    User-Agent: lipsync-webhook/1
    X-Job-Id: <job id>
    X-Webhook-Attempt: <1, 2, ...>
    X-Signature-Timestamp: <unix seconds when this attempt was signed>
    X-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>" under WEBHOOK_SECRET>

    {"id": "...", "status": "done", ...}

Verifying on the receiving side (copy ``verify_signature`` below; it only
needs the standard library): compute the HMAC over the timestamp header, a
dot and the *raw* request body bytes, compare in constant time, and reject
timestamps more than a few minutes away from your clock (replay protection).

Without ``WEBHOOK_SECRET`` the deliveries are still made but **unsigned**:
``X-Signature`` is absent (``X-Signature-Timestamp`` is still sent), and
receivers cannot tell them from forged requests. Set a secret in production.

Delivery is at-least-once: a receiver may see the same job twice (for example
when the server restarts after sending but before recording the success), so
deduplicate on the job id. Attempts are retried with exponential backoff
(``backoff * 2**(n-1)`` seconds, capped) on connection errors, timeouts, HTTP
5xx and 429, up to ``retries`` extra attempts; any other answer (2xx: done;
3xx/4xx: refused, not retried) ends the delivery. Redirects are not followed.

Each attempt has ``timeout`` seconds in all (connecting, sending, the status
and a bounded part of the answer); a receiver still answering then is cut
off, and the attempt counts as a timeout. A few sender threads deliver in
parallel, at most one attempt per receiver (scheme, host, port) at a time, so
a slow receiver delays its own webhooks only. Logs show targets as
``scheme://host[:port]/path`` (``redact_url``): never credentials or the
query string.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import hmac
import http.client
import io
import itertools
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from lipsync.errors import InvalidInputError

log = logging.getLogger("lipsync.jobs.webhooks")

SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Signature-Timestamp"
MAX_URL_LENGTH = 2048
USER_AGENT = "lipsync-webhook/1"


# --------------------------------------------------------------- signatures
def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``b"<timestamp>." + body``."""
    message = str(timestamp).encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify_signature(secret: str, timestamp: str | int, body: bytes, signature: str,
                     tolerance_s: float = 300, now: float | None = None) -> bool:
    """Check a webhook on the receiving side. Standalone: receivers can copy this function.

    ``timestamp`` and ``signature`` are the ``X-Signature-Timestamp`` and
    ``X-Signature`` header values, ``body`` the raw request body bytes.
    False when the signature does not match or the timestamp is more than
    ``tolerance_s`` seconds away from ``now`` (default: the current time).

        import hashlib, hmac, time
        def verify_signature(secret, timestamp, body, signature, tolerance_s=300, now=None):
            try:
                ts = int(timestamp)
            except (TypeError, ValueError):
                return False
            if abs((time.time() if now is None else now) - ts) > tolerance_s:
                return False
            expected = "sha256=" + hmac.new(secret.encode(), f"{ts}.".encode() + body,
                                            hashlib.sha256).hexdigest()
            return hmac.compare_digest(expected.encode(), (signature or "").encode())
    """
    try:
        ts = int(str(timestamp).strip())
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(secret, ts, body).encode(), signature.strip().encode("utf-8", "replace"))


# ---------------------------------------------------------------- validation
def validate_callback_url(url) -> str:
    """Return ``url`` if it is an absolute http(s) URL with a host that can be delivered to as
    written, else raise ``InvalidInputError`` (400, code ``invalid_callback_url``).

    Refused besides the obvious: credentials (``user:password@``; the signature is how a
    receiver authenticates deliveries), and anything but printable ASCII: write a non-ASCII
    host in its IDNA form (``xn--...``) and percent-encode the rest. Messages never repeat
    the URL.

    Private and loopback addresses are allowed on purpose: in a self-hosted
    deployment the receiver is often on the same network. Put the service
    behind an egress policy if callers must not reach internal hosts.
    """
    def bad(why: str) -> InvalidInputError:
        return InvalidInputError(f"'callback_url' {why}", code="invalid_callback_url")

    if not isinstance(url, str) or not url:
        raise bad("must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise bad(f"is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise bad("must not contain spaces or control characters")
    if not url.isascii():
        raise bad("must be plain ASCII: write a non-ASCII host name in its IDNA form (xn--...) "
                  "and percent-encode other characters (%C3%A4)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a malformed port
    except ValueError:
        raise bad("is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise bad("must not contain a user name or password (user:password@host); "
                  "receivers authenticate deliveries by their X-Signature")
    if not parts.hostname:
        raise bad("has no host")
    if port == 0:
        raise bad("has an invalid port")
    return url


def redact_url(url) -> str:
    """``url`` as logs may show it: ``scheme://host[:port]/path``, without credentials,
    query string or fragment (they often carry secrets). Never raises."""
    try:
        parts = urllib.parse.urlsplit(str(url))
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        try:
            port = parts.port
        except ValueError:
            port = None
        netloc = host if port is None else f"{host}:{port}"
        path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        return f"{parts.scheme.lower()}://{netloc}{path}"
    except Exception:  # noqa: BLE001 - a log line must not fail
        return "<unparseable url>"


def _origin(url: str) -> tuple[str, str, int | None]:
    """Who receives deliveries to ``url``: (scheme, host, port); at most one attempt per origin runs."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        return scheme, (parts.hostname or "").lower(), port
    except ValueError:
        return "", url, None


# ----------------------------------------------------------------- delivery
@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    ok: bool                 # 2xx
    retryable: bool          # connection error, timeout, 5xx, 429
    status: int | None       # HTTP status, None when no answer came
    error: str | None        # what went wrong, for the log


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _DeadlineError()
    return left


class _DeadlineError(TimeoutError):
    """The attempt's total time ran out."""


class _DeadlineReader(io.RawIOBase):
    """Reads from the socket, each given only the time left until the attempt's deadline,
    so a receiver sending a byte now and then cannot stretch an attempt."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # SocketIO: keeps the descriptor open while read
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(_time_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket whose sends and reads (through ``makefile("rb")``, which is how
    ``http.client`` reads answers) end at ``deadline``; everything else is the socket's."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data) -> None:
        self._sock.settimeout(_time_left(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode="r", *args, **kwargs):
        if mode != "rb":
            return self._sock.makefile(mode, *args, **kwargs)
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _DeadlineConnection:
    """Mixin for ``http.client`` connections: connecting gets the time left (TCP and TLS,
    through a proxy tunnel too), then every send and read of the attempt does."""

    def __init__(self, *args, deadline: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        self.timeout = _time_left(self._deadline)
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(_DeadlineHTTPConnection, deadline=req.deadline), req, **kwargs)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(_DeadlineHTTPSConnection, deadline=req.deadline), req, **kwargs)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib hook
        return None  # a 3xx then surfaces as HTTPError and ends the delivery


# Proxies from the environment as urllib always did; no redirects; a total deadline per attempt.
_opener = urllib.request.build_opener(_NoRedirect(), _DeadlineHTTPHandler(), _DeadlineHTTPSHandler())
MAX_ANSWER_READ = 65536  # bytes of the receiver's answer read (and ignored) before closing


def deliver_once(url: str, body: bytes, *, secret: str | None, timeout: float, attempt: int = 1,
                 job_id: str | None = None) -> Attempt:
    """POST ``body`` (JSON bytes) to ``url`` once, signed when ``secret`` is set.

    ``timeout`` bounds the whole attempt: connecting, sending, the status and
    up to ``MAX_ANSWER_READ`` bytes of the answer (name resolution aside). A
    receiver still answering at the deadline is cut off: a retryable failure.
    A URL ``validate_callback_url`` refuses fails at once, not retryable.
    """
    try:
        validate_callback_url(url)
    except InvalidInputError as exc:
        return Attempt(ok=False, retryable=False, status=None, error=exc.message)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, TIMESTAMP_HEADER: timestamp,
               "X-Webhook-Attempt": str(attempt)}
    if job_id:
        headers["X-Job-Id"] = job_id
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    request.deadline = time.monotonic() + timeout  # read by the _Deadline* handlers
    try:
        with _opener.open(request, timeout=timeout) as response:
            response.read(MAX_ANSWER_READ)
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
        retryable = status >= 500 or status == 429
        return Attempt(ok=False, retryable=retryable, status=status, error=f"HTTP {status}")
    except Exception as exc:  # noqa: BLE001 - connection errors, timeouts, a broken answer (BadStatusLine...)
        return Attempt(ok=False, retryable=True, status=None, error=_describe_error(exc, url, timeout))
    if 200 <= status < 300:
        return Attempt(ok=True, retryable=False, status=status, error=None)
    return Attempt(ok=False, retryable=status >= 500 or status == 429, status=status, error=f"HTTP {status}")


def _describe_error(exc: BaseException, url: str, timeout: float) -> str:
    """A failed attempt in words for the log, without the URL's secrets."""
    reason = getattr(exc, "reason", exc)
    if not isinstance(reason, BaseException):
        reason = exc
    if isinstance(reason, TimeoutError):
        return f"no complete answer within {timeout:g} s"
    text = f"{type(reason).__name__}: {reason}"
    if url in text:
        text = text.replace(url, redact_url(url))
    password = urllib.parse.urlsplit(url).password
    if password and password in text:
        text = text.replace(password, "***")
    return text


def encode_payload(payload: dict) -> bytes:
    """The exact body bytes that are signed and sent."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    key: str | None = field(compare=False, default=None)
    attempts: int = field(compare=False, default=0)

    @property
    def target(self) -> str:
        return redact_url(self.url)


# on_result(key, delivered, attempts, last_error)
ResultCallback = Callable[[str | None, bool, int, str | None], None]

DEFAULT_WORKERS = 4


class WebhookSender:
    """Delivers webhooks from a small fixed pool of threads (``workers``), so nothing else
    ever waits on a receiver and receivers hardly wait on each other.

    ``send()`` only enqueues. Deliveries are made in order of their due time;
    those waiting for a retry hold up nothing. Each attempt ends after at most
    ``timeout`` seconds in all, and at most one attempt per receiver (scheme,
    host and port) runs at a time: a slow receiver occupies one sender thread,
    however many webhooks it is due, while the others keep delivering.
    """

    def __init__(self, secret: str | None, *, retries: int = 5, timeout: float = 10.0, backoff: float = 1.0,
                 max_backoff: float = 300.0, on_result: ResultCallback | None = None,
                 workers: int = DEFAULT_WORKERS):
        self.secret = secret or None
        self.retries = max(0, int(retries))
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.on_result = on_result
        self.workers = max(1, int(workers))
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy: set[tuple] = set()                     # origins with an attempt in flight
        self._parked: dict[tuple, list[_Delivery]] = {}    # due, waiting for their origin's attempt
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()]  # one may still finish an attempt
            if not self._stopping and len(self._threads) >= self.workers:
                return
            self._stopping = False
            for n in range(len(self._threads), self.workers):
                thread = threading.Thread(target=self._run, name=f"lipsync-webhooks-{n + 1}", daemon=True)
                thread.start()
                self._threads.append(thread)
        if not self.secret:
            log.warning("WEBHOOK_SECRET is not set: job webhooks are sent unsigned")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the attempts in flight; undelivered webhooks are dropped from memory
        (the job store keeps them 'pending', so the next start sends them again)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()]

    def send(self, url: str, payload: dict, *, key: str | None = None) -> None:
        """Queue a delivery of ``payload`` (JSON) to ``url``; returns at once."""
        delivery = _Delivery(due=time.monotonic(), seq=next(self._seq), url=url, body=encode_payload(payload),
                             key=key)
        with self._cond:
            heapq.heappush(self._heap, delivery)
            self._cond.notify_all()

    def pending(self) -> int:
        """Deliveries queued, waiting for a retry, or in flight."""
        with self._cond:
            return self._pending()

    def _pending(self) -> int:
        return len(self._heap) + sum(map(len, self._parked.values())) + len(self._busy)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending (tests, graceful shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending(), timeout)

    def _next(self) -> _Delivery | None:
        """The next delivery to attempt, taking its origin (under ``_cond``); None when none is due."""
        now = time.monotonic()
        while self._heap and self._heap[0].due <= now:
            delivery = heapq.heappop(self._heap)
            origin = _origin(delivery.url)
            if origin in self._busy:
                self._parked.setdefault(origin, []).append(delivery)  # in due order: popped in due order
                continue
            self._busy.add(origin)
            return delivery
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    delivery = self._next()
                    if delivery is not None:
                        break
                    self._cond.wait(None if not self._heap else self._heap[0].due - time.monotonic())
            try:
                self._attempt(delivery)
            except Exception:  # noqa: BLE001 - the sender threads must survive anything
                log.exception("webhook delivery to %s crashed", delivery.target)
            finally:
                with self._cond:
                    self._release(delivery)
                    self._cond.notify_all()

    def _release(self, delivery: _Delivery) -> None:
        """The attempt for ``delivery``'s origin is over: its parked deliveries are due again."""
        origin = _origin(delivery.url)
        self._busy.discard(origin)
        for parked in self._parked.pop(origin, ()):
            heapq.heappush(self._heap, parked)

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.attempts += 1
        result = deliver_once(delivery.url, delivery.body, secret=self.secret, timeout=self.timeout,
                              attempt=delivery.attempts, job_id=delivery.key)
        if result.ok:
            log.info("webhook for %s delivered to %s (attempt %d)", delivery.key, delivery.target,
                     delivery.attempts)
            self._report(delivery, True, None)
            return
        if result.retryable and delivery.attempts <= self.retries:
            delay = min(self.max_backoff, self.backoff * 2 ** (delivery.attempts - 1))
            log.warning("webhook for %s to %s failed (%s); retry %d/%d in %.1f s", delivery.key, delivery.target,
                        result.error, delivery.attempts, self.retries, delay)
            delivery.due = time.monotonic() + delay
            with self._cond:
                heapq.heappush(self._heap, delivery)
                self._cond.notify_all()
            return
        log.error("webhook for %s to %s given up after %d attempt(s): %s", delivery.key, delivery.target,
                  delivery.attempts, result.error)
        self._report(delivery, False, result.error)

    def _report(self, delivery: _Delivery, ok: bool, error: str | None) -> None:
        if self.on_result is not None:
            try:
                self.on_result(delivery.key, ok, delivery.attempts, error)
            except Exception:  # noqa: BLE001
                log.exception("webhook result callback failed")
