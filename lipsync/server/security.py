"""API keys and per-client rate limits (README "Security"), without Flask.

* ``presented_key(headers, method, query)``: the key a request carries, if any.
* ``Security``: the configured keys (compared as SHA-256 digests, in constant time,
  every one of them) and the 401 for a request without a valid one; owns the
  ``RateLimiter``.
* ``RateLimiter``: moving-window limits per client and bucket (429 ``rate_limited``).

The web layer decides which routes are public and which bucket a route counts in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Mapping

from lipsync.errors import RefusedError
from lipsync.server.observability import Metrics
from lipsync.server.settings import ServerSettings, parse_rate_limit

log = logging.getLogger("lipsync.web")


def presented_key(headers: Mapping[str, str], method: str, query: Mapping[str, str]) -> str | None:
    """The API key a request presents: ``Authorization: Bearer <key>``, else ``X-API-Key``, else
    (GET/HEAD only: EventSource and <video> cannot send headers) the ``api_key`` query parameter.

    ``headers`` must look names up case-insensitively (as werkzeug's do)."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    key = headers.get("X-API-Key")
    if key:
        return key.strip()
    if method in ("GET", "HEAD"):
        return query.get("api_key") or None
    return None


class Security:
    """API keys and rate limits of one app."""

    def __init__(self, settings: ServerSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        # compare SHA-256 digests: equal lengths, so compare_digest leaks nothing, not even the length
        self._keys = [(hashlib.sha256(k.encode()).digest(), hashlib.sha256(k.encode()).hexdigest()[:12])
                      for k in settings.api_keys]
        if any(len(k) < 16 for k in settings.api_keys):
            log.warning("API_KEYS has keys shorter than 16 characters; use long random keys")
        self.limiter = RateLimiter(settings, metrics)

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def key_id(self, presented: str | None) -> str | None:
        """The id (hash prefix) of the configured key equal to ``presented``; every key is compared."""
        if presented is None or not self._keys:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key_digest, key_id in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = key_id
        return found

    def require_key(self, presented: str | None, key_id: str | None) -> None:
        """When keys are configured, refuse a request without a valid one: ``RefusedError`` 401
        ``unauthorized`` with a ``WWW-Authenticate`` challenge (counted in ``auth_failures``).

        ``presented``: what the request sent (``presented_key``); ``key_id``: ``key_id(presented)``."""
        if not self.keys_required or key_id is not None:
            return
        self.metrics.auth_failures.inc()
        sent = presented is not None
        challenge = 'Bearer realm="lipsync"' + (', error="invalid_token"' if sent else "")
        raise RefusedError("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                        if not sent else "the API key is not valid", code="unauthorized", status=401,
                        headers={"WWW-Authenticate": challenge})


class RateLimiter:
    """Moving-window limits per client over ``limits`` storage: in memory, or Redis (shared by
    processes and hosts) when ``RATE_LIMIT_STORAGE_URI``/``REDIS_URL`` is set.

    If the storage fails (Redis down) requests are let through and the failure is logged and
    counted (``lipsync_rate_limit_storage_errors_total``): the limiter protects, never takes the
    service down with it."""

    def __init__(self, settings: ServerSettings, metrics: Metrics):
        self.metrics = metrics
        self.buckets = {"write": parse_rate_limit(settings.rate_limit, "rate_limit"),
                        "read": parse_rate_limit(settings.rate_limit_read, "rate_limit_read")}
        self.strategy = None
        self._last_error_log = 0.0
        if any(self.buckets.values()):
            from limits.storage import storage_from_string
            from limits.strategies import MovingWindowRateLimiter

            uri = settings.rate_limit_storage_uri
            options = {} if uri.startswith("memory") else {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
            self.storage = storage_from_string(uri, **options)
            self.strategy = MovingWindowRateLimiter(self.storage)

    def hit(self, bucket: str, identity: str) -> dict | None:
        """Count one request of client ``identity`` in ``bucket`` (``write``/``read``); raise
        ``RefusedError`` 429 when over a limit. Returns the X-RateLimit-* headers (None: no limit)."""
        items = self.buckets.get(bucket) or []
        if not items or self.strategy is None:
            return None
        try:
            headers = None
            for item in items:
                if not self.strategy.hit(item, "lipsync", bucket, identity):
                    stats = self.strategy.get_window_stats(item, "lipsync", bucket, identity)
                    retry = max(1, math.ceil(stats.reset_time - time.time()))
                    self.metrics.rate_limited.labels(bucket).inc()
                    raise RefusedError(f"too many requests: the limit is {item}; retry in {retry} s",
                                    code="rate_limited", status=429, retry_after=retry,
                                    headers=_limit_headers(item, 0, stats.reset_time))
                if headers is None:
                    stats = self.strategy.get_window_stats(item, "lipsync", bucket, identity)
                    headers = _limit_headers(item, stats.remaining, stats.reset_time)
            return headers
        except RefusedError:
            raise
        except Exception as exc:  # noqa: BLE001 - storage down: let the request through
            self.metrics.rate_limit_errors.inc()
            now = time.monotonic()
            if now - self._last_error_log > 60:
                self._last_error_log = now
                log.error("rate-limit storage failed, requests are not limited: %s: %s", type(exc).__name__, exc)
            return None


def _limit_headers(item, remaining: int, reset_time: float) -> dict:
    """The X-RateLimit-* headers for limit ``item``: its amount, what remains, when (epoch s) the window resets."""
    return {"X-RateLimit-Limit": str(item.amount), "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(math.ceil(reset_time))}
