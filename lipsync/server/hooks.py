"""What runs around every request: the guard (API key, rate limit, shutdown), the response
decoration (security headers, CORS, rate-limit headers) and the JSON error answers.

The guards themselves are ``lipsync.server.security`` (keys, limits) and
``lipsync.server.lifecycle`` (shutdown); this module decides which routes they apply to.
"""

from __future__ import annotations

import logging

from flask import Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing.exceptions import WebsocketMismatch

from lipsync.errors import LipsyncError
from lipsync.server import context
from lipsync.server.observability import ENV_ERROR_CODE, ENV_KEY_ID, ENV_ROUTE
from lipsync.server.security import Security, presented_key

log = logging.getLogger("lipsync.web")

# Never behind an API key: the page and what it loads before the user can do anything.
PUBLIC_ENDPOINTS = frozenset({"pages.index", "static", "api.health", "api.avatar", "api.openapi", "api.models"})
# Endpoints that start work: the strict rate limit, refused while shutting down.
WRITE_ENDPOINTS = frozenset({"api.generate", "jobs.submit", "avatars.add", "sessions.create"})
# The looser limit: reads and cancels of jobs.
READ_ENDPOINTS = frozenset({"jobs.status", "jobs.events", "jobs.video", "jobs.stream", "jobs.cancel",
                            "avatars.index", "avatars.show", "avatars.thumbnail", "avatars.image",
                            "avatars.delete", "sessions.show", "sessions.delete", "sessions.video",
                            "sessions.conversation"})

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "media-src 'self' blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
                           "base-uri 'self'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), geolocation=(), payment=(), usb=()",
}
CORS_EXPOSED = ("X-Request-ID, Retry-After, Location, Content-Range, Accept-Ranges, Content-Length, Server-Timing, "
                "X-Processing-Time, X-Video-Duration, X-Video-Frames, X-Engine, X-Speech-Language, X-RateLimit-Limit, "
                "X-RateLimit-Remaining, X-RateLimit-Reset")
CORS_ALLOWED_HEADERS = "Authorization, X-API-Key, Content-Type, X-Request-ID, Range"
# werkzeug's HTTP errors whose code is not simply their name in snake case
HTTP_ERROR_CODES = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}
# A generate request has at most a handful of form fields (audio, avatar, text, language,
# callback_url): far fewer parts than werkzeug's default of 1000 are ever legitimate.
MAX_FORM_PARTS = 32


def guard():
    """Before every request: route label, rate limit, API key, shutdown."""
    env = request.environ
    env[ENV_ROUTE] = request.url_rule.rule if request.url_rule is not None else None
    endpoint = request.endpoint
    if request.method == "OPTIONS" or endpoint is None:
        return None  # CORS preflight / unknown path: nothing to protect (404/405 follow)
    security: Security = current_app.extensions["security"]
    presented = presented_key(request.headers, request.method, request.args)
    key_id = security.key_id(presented)
    if key_id:
        env[ENV_KEY_ID] = key_id
    bucket = "write" if endpoint in WRITE_ENDPOINTS else "read" if endpoint in READ_ENDPOINTS else None
    if bucket is not None:
        identity = f"key:{key_id}" if key_id else f"ip:{request.remote_addr}"
        g.rate_limit_headers = security.limiter.hit(bucket, identity)
    if not (endpoint in PUBLIC_ENDPOINTS or (endpoint == "ops.metrics" and context.server_settings().metrics_public)):
        security.require_key(presented, key_id)
    if endpoint in WRITE_ENDPOINTS:
        context.lifecycle().check_accepting()
    return None


def decorate(response: Response) -> Response:
    """After every request: security headers, CORS, rate-limit headers."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "application/json":
        response.headers.setdefault("Cache-Control", "no-store")
    for name, value in (getattr(g, "rate_limit_headers", None) or {}).items():
        response.headers.setdefault(name, value)
    origin = request.headers.get("Origin")
    allowed = context.server_settings().cors_origins
    if origin and allowed and request.path.startswith("/api/") and ("*" in allowed or origin in allowed):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = CORS_ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
    if allowed and "*" not in allowed:
        response.vary.add("Origin")
    return response


def lipsync_error(exc: LipsyncError):
    """Any ``LipsyncError``: its JSON (``error``, ``code``, maybe ``retry_after``), status and headers."""
    if exc.status >= 500:  # 503s (busy, circuit open, shutting down) are expected under stress: warnings
        log.log(logging.WARNING if exc.status == 503 else logging.ERROR, "%s: %s", exc.code, exc.message)
    request.environ[ENV_ERROR_CODE] = exc.code
    if exc.status in (400, 413, 422):  # bad input (401/429/503 have counters and gauges of their own)
        context.metrics().refused.labels(exc.code).inc()
    return jsonify(exc.to_dict()), exc.status, exc.response_headers()


def http_error(exc: HTTPException):
    """werkzeug's own errors (404, 405, 413 from MAX_CONTENT_LENGTH...) as the same JSON."""
    code = HTTP_ERROR_CODES.get(exc.code, (exc.name or "http_error").lower().replace(" ", "_"))
    message = exc.description or exc.name
    if isinstance(exc, WebsocketMismatch):
        code = "websocket_required"
        message = "this URL is a WebSocket: connect with ws:// or wss:// (Upgrade: websocket)"
    if exc.code == 413:
        limit = request.max_content_length or context.settings().max_upload_bytes
        message = f"the request body is larger than the limit of {limit} bytes"
        if _too_many_parts(exc):
            code, message = "too_many_parts", f"the form has more than {MAX_FORM_PARTS} parts"
    request.environ[ENV_ERROR_CODE] = code
    response = jsonify({"error": message, "code": code})
    response.status_code = exc.code or 500
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def unexpected_error(exc: Exception):
    if _malformed_body(exc):
        request.environ[ENV_ERROR_CODE] = "invalid_body"
        return jsonify({"error": "the request body is malformed (its chunked encoding cannot be read)",
                        "code": "invalid_body"}), 400, {"Connection": "close"}
    log.exception("unexpected error on %s %s", request.method, request.path)
    request.environ[ENV_ERROR_CODE] = "internal_error"
    return jsonify({"error": "internal error; the server log has the details", "code": "internal_error"}), 500


def _malformed_body(exc: Exception) -> bool:
    """An error of the server's body reader on a broken request (a malformed chunk size, a body
    that ends early), not of ours: gunicorn raises its http errors, werkzeug an OSError."""
    if type(exc).__module__.startswith("gunicorn.http"):
        return True
    return isinstance(exc, OSError) and "chunk" in str(exc).lower()


def _too_many_parts(exc: HTTPException) -> bool:
    """Whether werkzeug's 413 came from counting form parts (MAX_FORM_PARTS), not from a size.

    werkzeug raises the same bare RequestEntityTooLarge for both; its multipart decoder, the
    frame that raised, knows which limit it hit."""
    tb = exc.__traceback__
    while tb is not None:
        decoder = tb.tb_frame.f_locals.get("self")
        max_parts = getattr(decoder, "max_parts", None)
        if max_parts is not None and getattr(decoder, "_parts_decoded", 0) > max_parts:
            return True
        tb = tb.tb_next
    return False
