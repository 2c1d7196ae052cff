"""Signed webhook deliveries for finished jobs.

When a job that was submitted with a ``callback_url`` ends (``done``,
``failed`` or ``cancelled``), the service POSTs the job's final state, the
same JSON object ``GET /api/jobs/<id>`` returns, to that URL::

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
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
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
    """Return ``url`` if it is an absolute http(s) URL with a host, else raise
    ``InvalidInputError`` (400, code ``invalid_callback_url``).

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
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a malformed port
    except ValueError:
        raise bad("is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("must be an http:// or https:// URL")
    if not parts.hostname:
        raise bad("has no host")
    if port == 0:
        raise bad("has an invalid port")
    return url


# ----------------------------------------------------------------- delivery
@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    ok: bool                 # 2xx
    retryable: bool          # connection error, timeout, 5xx, 429
    status: int | None       # HTTP status, None when no answer came
    error: str | None        # what went wrong, for the log


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib hook
        return None  # a 3xx then surfaces as HTTPError and ends the delivery


_opener = urllib.request.build_opener(_NoRedirect())


def deliver_once(url: str, body: bytes, *, secret: str | None, timeout: float, attempt: int = 1,
                 job_id: str | None = None) -> Attempt:
    """POST ``body`` (JSON bytes) to ``url`` once, signed when ``secret`` is set."""
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, TIMESTAMP_HEADER: timestamp,
               "X-Webhook-Attempt": str(attempt)}
    if job_id:
        headers["X-Job-Id"] = job_id
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout) as response:
            response.read(65536)
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
        retryable = status >= 500 or status == 429
        return Attempt(ok=False, retryable=retryable, status=status, error=f"HTTP {status}")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Attempt(ok=False, retryable=True, status=None, error=f"{type(reason).__name__}: {reason}")
    except Exception as exc:  # noqa: BLE001 - e.g. http.client.BadStatusLine from a broken receiver
        return Attempt(ok=False, retryable=True, status=None, error=f"{type(exc).__name__}: {exc}")
    if 200 <= status < 300:
        return Attempt(ok=True, retryable=False, status=status, error=None)
    return Attempt(ok=False, retryable=status >= 500 or status == 429, status=status, error=f"HTTP {status}")


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


# on_result(key, delivered, attempts, last_error)
ResultCallback = Callable[[str | None, bool, int, str | None], None]


class WebhookSender:
    """Delivers webhooks from its own thread, so nothing else ever waits on a receiver.

    ``send()`` only enqueues. Deliveries waiting for a retry do not hold up
    others (they are scheduled by due time); one slow receiver can delay the
    others by at most ``timeout`` seconds per attempt.
    """

    def __init__(self, secret: str | None, *, retries: int = 5, timeout: float = 10.0, backoff: float = 1.0,
                 max_backoff: float = 300.0, on_result: ResultCallback | None = None):
        self.secret = secret or None
        self.retries = max(0, int(retries))
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.on_result = on_result
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="lipsync-webhooks", daemon=True)
            self._thread.start()
        if not self.secret:
            log.warning("WEBHOOK_SECRET is not set: job webhooks are sent unsigned")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the attempt in flight; undelivered webhooks are dropped from memory
        (the job store keeps them 'pending', so the next start sends them again)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

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
            return len(self._heap) + (1 if self._busy else 0)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending (tests, graceful shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._heap or self._busy), timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._heap and self._heap[0].due <= now:
                        break
                    self._cond.wait(None if not self._heap else self._heap[0].due - now)
                if self._stopping:
                    return
                delivery = heapq.heappop(self._heap)
                self._busy = True
            try:
                self._attempt(delivery)
            except Exception:  # noqa: BLE001 - the sender thread must survive anything
                log.exception("webhook delivery to %s crashed", delivery.url)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.attempts += 1
        result = deliver_once(delivery.url, delivery.body, secret=self.secret, timeout=self.timeout,
                              attempt=delivery.attempts, job_id=delivery.key)
        if result.ok:
            log.info("webhook for %s delivered to %s (attempt %d)", delivery.key, delivery.url, delivery.attempts)
            self._report(delivery, True, None)
            return
        if result.retryable and delivery.attempts <= self.retries:
            delay = min(self.max_backoff, self.backoff * 2 ** (delivery.attempts - 1))
            log.warning("webhook for %s to %s failed (%s); retry %d/%d in %.1f s", delivery.key, delivery.url,
                        result.error, delivery.attempts, self.retries, delay)
            delivery.due = time.monotonic() + delay
            with self._cond:
                heapq.heappush(self._heap, delivery)
            return
        log.error("webhook for %s to %s given up after %d attempt(s): %s", delivery.key, delivery.url,
                  delivery.attempts, result.error)
        self._report(delivery, False, result.error)

    def _report(self, delivery: _Delivery, ok: bool, error: str | None) -> None:
        if self.on_result is not None:
            try:
                self.on_result(delivery.key, ok, delivery.attempts, error)
            except Exception:  # noqa: BLE001
                log.exception("webhook result callback failed")
