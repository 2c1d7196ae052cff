"""Operations: structured (JSON) logs, request ids and Prometheus metrics.

* ``configure_logging(level, fmt)``: one JSON object per line on stderr
  (``fmt="json"``) or classic text lines. Called by the entry points
  (``python app.py``, ``gunicorn_conf``, the CLI may too), never by
  ``create_app``, so tests and embedding applications keep their logging.
* ``RequestObserver``: WSGI middleware that gives every request an id
  (a sane incoming ``X-Request-ID`` is kept, otherwise a random one), returns
  it in the ``X-Request-ID`` response header, and when the response is done
  (streams included) writes one ``request`` log line and updates the metrics.
* ``Metrics``: a private ``prometheus_client`` registry per app (several apps
  in one process, as in the tests, never collide), rendered by ``GET /metrics``.
* ``job_log_fields(state)``: the fields of the one ``job`` log line per
  finished job; ``record_finished_job`` writes it and updates the job metrics.

What is never logged: the request text (unless ``LOG_TEXT=1``: then the
request line carries its first 200 characters), query strings (they may carry an ``api_key``), API keys (only a
short hash, ``key_id``), upload contents.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REQUEST_ID_HEADER = "X-Request-ID"
METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Incoming ids we keep: what tracing systems and proxies send (uuids, hex, base64url, dotted), bounded.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")

# Keys the WSGI environ carries between the Flask layer and the middleware.
ENV_REQUEST_ID = "lipsync.request_id"
ENV_ROUTE = "lipsync.route"            # the matched URL rule ("/api/jobs/<job_id>"), bounded cardinality
ENV_ERROR_CODE = "lipsync.error_code"  # the JSON error code of a 4xx/5xx we answered
ENV_KEY_ID = "lipsync.key_id"          # short hash of the API key that authenticated the request
ENV_JOB_ID = "lipsync.job_id"          # the job a request created or read
ENV_TEXT = "lipsync.tts.text"              # the request text, only when LOG_TEXT is on (truncated)

STAGES = ("tts", "decode", "avatar", "lipsync", "composite", "encode", "total", "queue_wait")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("lipsync_request_id", default=None)

access_log = logging.getLogger("lipsync.access")
job_log = logging.getLogger("lipsync.jobs")


def current_request_id() -> str | None:
    """The id of the request this thread serves, None outside a request."""
    return _request_id.get()


def sane_request_id(value: str | None) -> str | None:
    """``value`` when it is a reasonable request id to echo and log, else None."""
    if value and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------ logging
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, ``request_id`` (when in a
    request) and every ``extra=`` field; an exception goes to ``exc`` (logs only, never to clients)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        rid = getattr(record, "request_id", None) or current_request_id()
        if rid:
            data["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in data and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people reading a terminal."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        if extras:
            line += " " + " ".join(f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in extras.items())
        return line


def configure_logging(level: str = "INFO", fmt: str = "json", stream=None) -> None:
    """Send every log record to ``stream`` (stderr) as JSON lines or text. Idempotent."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._lipsync = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_lipsync", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # werkzeug's own access lines would duplicate ours (and are not JSON)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


# ------------------------------------------------------------------ metrics
class Metrics:
    """The app's Prometheus metrics. ``collect_state`` callbacks add gauges read at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lipsync_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "lipsync_http_request_duration_seconds", "HTTP request duration (to the last byte sent)",
            ["method", "route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.in_progress = Gauge("lipsync_http_requests_in_progress", "Requests being handled", registry=r)
        self.stage_seconds = Histogram(
            "lipsync_stage_duration_seconds", "Pipeline stage durations (source: sync request or job)",
            ["stage", "source"], registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.jobs_finished = Counter("lipsync_jobs_finished", "Jobs the engine worker ended, by final status",
                                     ["status", "code"], registry=r)
        self.rate_limited = Counter("lipsync_rate_limited", "Requests refused with 429 rate_limited",
                                    ["bucket"], registry=r)
        self.rate_limit_errors = Counter("lipsync_rate_limit_storage_errors",
                                         "Rate-limit storage failures (requests were let through)", registry=r)
        self.auth_failures = Counter("lipsync_auth_failures", "Requests refused with 401", registry=r)
        self.refused = Counter("lipsync_refused", "Requests refused before any work, by error code",
                               ["code"], registry=r)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._state = _StateCollector()
        r.register(self._state)

    def add_state(self, fn: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Register ``fn``, called at every scrape, yielding metric families (queue depth, ...)."""
        self._state.sources.append(fn)

    def observe_stages(self, timings: dict | None, source: str) -> None:
        for stage, ms in (timings or {}).items():
            if stage in STAGES and isinstance(ms, (int, float)) and ms >= 0:
                self.stage_seconds.labels(stage, source).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self):
        self.sources: list[Callable[[], Iterable[GaugeMetricFamily]]] = []

    def describe(self):
        return []

    def collect(self):
        for source in self.sources:
            try:
                yield from source()
            except Exception:  # noqa: BLE001 - a broken gauge must not break the scrape
                logging.getLogger("lipsync.metrics").exception("metrics source failed")


def gauge(name: str, documentation: str, value: float | None = None, labels: dict | None = None,
          samples: Iterable[tuple[dict, float]] = ()) -> GaugeMetricFamily:
    """A gauge family with one value or labelled ``samples`` ((labels, value) pairs)."""
    samples = list(samples)
    label_names = sorted(labels) if labels else (sorted(samples[0][0]) if samples else [])
    family = GaugeMetricFamily(name, documentation, labels=label_names)
    if labels is not None:
        family.add_metric([str(labels[k]) for k in label_names], float(value or 0.0))
    elif samples:
        for sample_labels, sample_value in samples:
            family.add_metric([str(sample_labels[k]) for k in label_names], float(sample_value))
    elif value is not None:
        family = GaugeMetricFamily(name, documentation, value=float(value))
    return family


# --------------------------------------------------------------- middleware
class RequestObserver:
    """WSGI middleware: request id, one access log line and the HTTP metrics per request.

    The line is written when the response is closed, so ``duration_ms`` and
    ``bytes`` cover streamed bodies (SSE, live video) too.
    """

    def __init__(self, app, metrics: Metrics, logger: logging.Logger = access_log):
        self.app = app
        self.metrics = metrics
        self.log = logger

    def __call__(self, environ, start_response):
        rid = sane_request_id(environ.get("HTTP_X_REQUEST_ID")) or new_request_id()
        environ[ENV_REQUEST_ID] = rid
        token = _request_id.set(rid)
        started = time.perf_counter()
        seen = {"status": 500}

        def observed_start_response(status, headers, exc_info=None):
            seen["status"] = int(status.split(" ", 1)[0])
            headers = [(k, v) for k, v in headers if k.lower() != "x-request-id"]
            headers.append((REQUEST_ID_HEADER, rid))
            return start_response(status, headers, exc_info)

        self.metrics.in_progress.inc()
        try:
            body = self.app(environ, observed_start_response)
        except BaseException:
            self.metrics.in_progress.dec()
            self._finish(environ, 500, started, 0)
            raise
        finally:
            _request_id.reset(token)
        return _ObservedBody(body, lambda sent: self._end(environ, seen["status"], started, sent))

    def _end(self, environ, status: int, started: float, sent: int) -> None:
        self.metrics.in_progress.dec()
        self._finish(environ, status, started, sent)

    def _finish(self, environ, status: int, started: float, sent: int) -> None:
        seconds = time.perf_counter() - started
        method = environ.get("REQUEST_METHOD", "GET")
        route = environ.get(ENV_ROUTE) or "unmatched"
        try:
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.request_seconds.labels(method, route).observe(seconds)
        except Exception:  # noqa: BLE001
            pass
        fields = {"event": "request", "request_id": environ.get(ENV_REQUEST_ID), "method": method,
                  "path": clip(environ.get("PATH_INFO", ""), 200), "route": route, "status": status,
                  "duration_ms": round(seconds * 1000.0, 1), "bytes": sent,
                  "request_bytes": _int(environ.get("CONTENT_LENGTH")),
                  "client": environ.get("REMOTE_ADDR"), "user_agent": clip(environ.get("HTTP_USER_AGENT", ""), 160)}
        for key, name in ((ENV_ERROR_CODE, "error_code"), (ENV_KEY_ID, "key_id"), (ENV_JOB_ID, "job_id"),
                          (ENV_TEXT, "text")):
            if environ.get(key):
                fields[name] = environ[key]
        level = logging.ERROR if status >= 500 else logging.INFO
        self.log.log(level, "%s %s %s %.1f ms", method, fields["path"], status, fields["duration_ms"], extra=fields)


class _ObservedBody:
    """The response iterable, counting bytes and reporting once when closed (or exhausted)."""

    def __init__(self, body, on_close: Callable[[int], None]):
        self._body = body
        self._on_close = on_close
        self._sent = 0
        self._closed = False
        self._lock = threading.Lock()

    def __iter__(self):
        for chunk in self._body:
            self._sent += len(chunk)
            yield chunk

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close(self._sent)


def job_log_fields(state: dict) -> dict:
    """The fields of the ``job`` log line for a finished job's state (never the user's text)."""
    def seconds(iso: str | None) -> float | None:
        if not iso:
            return None
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

    started, finished = seconds(state.get("started_at")), seconds(state.get("finished_at"))
    fields = {"event": "job", "job_id": state.get("id"), "status": state.get("status"),
              "stage": state.get("stage"), "engine": state.get("engine"),
              "duration_ms": round((finished - started) * 1000.0, 1) if started and finished else None,
              "video_seconds": state.get("duration"), "frames": state.get("frames"),
              "timings": state.get("timings") or {}}
    error = state.get("error") or {}
    if error:
        fields["error_code"] = error.get("code")
    return fields


def record_finished_job(metrics: Metrics, state: dict) -> None:
    """A job queue's ``on_job_end``: the job metrics and one ``job`` log line (a warning when it failed)
    for the finished job's ``state`` (``JobQueue.get``'s dict)."""
    code = (state.get("error") or {}).get("code") or ""
    metrics.jobs_finished.labels(state.get("status") or "", code).inc()
    if state.get("status") == "done":
        metrics.observe_stages(state.get("timings"), "job")
    fields = job_log_fields(state)
    level = logging.WARNING if state.get("status") == "failed" else logging.INFO
    job_log.log(level, "job %s %s", state.get("id"), state.get("status"), extra=fields)


def clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


__all__ = ["ENV_ERROR_CODE", "ENV_JOB_ID", "ENV_KEY_ID", "ENV_REQUEST_ID", "ENV_ROUTE", "ENV_TEXT", "JsonFormatter",
           "METRICS_CONTENT_TYPE", "Metrics", "REQUEST_ID_HEADER", "RequestObserver", "TextFormatter", "clip",
           "configure_logging", "current_request_id", "gauge", "job_log_fields", "new_request_id",
           "record_finished_job", "sane_request_id"]
