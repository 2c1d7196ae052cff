"""Operations: ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from flask import Blueprint, Response

from lipsync.server import context
from lipsync.server.observability import METRICS_CONTENT_TYPE

ops = Blueprint("ops", __name__)


@ops.get("/metrics")
def metrics():
    return Response(context.metrics().render(), content_type=METRICS_CONTENT_TYPE,
                    headers={"Cache-Control": "no-store"})
