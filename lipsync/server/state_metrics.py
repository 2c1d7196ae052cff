"""The server's state as gauges, read at every scrape of ``GET /metrics``.

Readiness and the engine in use, the remote TTS circuit breaker, jobs by status and the
queue depth, synchronous renders, and whether a graceful shutdown began.
"""

from __future__ import annotations

import os

from lipsync.server.lifecycle import Lifecycle, RenderSlots
from lipsync.server.observability import Metrics, gauge

_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def register_state_metrics(metrics: Metrics, service, jobs, slots: RenderSlots,
                           lifecycle: Lifecycle) -> None:
    """Add the state gauges to ``metrics``: ``service`` (a ``LipsyncService``), ``jobs`` (a
    ``JobQueue``; job counts when it has a store that counts), the app's render slots and lifecycle."""
    def state():
        info = service.describe()
        yield gauge(
            "lipsync_ready", "1 when models are loaded and requests are served", 1 if info["status"] == "ready" else 0
        )
        yield gauge(
            "lipsync_engine_info",
            "The lip-sync engine, device and TTS in use",
            1,
            labels={
                "engine": info.get("engine") or "",
                "device": info.get("device") or "",
                "version": info.get("version") or "",
                "checkpoint": os.path.basename(info.get("checkpoint") or ""),
                "tts_provider": info.get("tts_provider") or "",
                "face_detector": info.get("face_detector") or "",
            },
        )
        breaker = getattr(service.tts, "breaker", None)
        if breaker is not None:
            yield gauge(
                "lipsync_tts_circuit_state",
                "Remote TTS circuit breaker: 0 closed, 1 half-open, 2 open",
                _BREAKER_STATES.get(breaker.state, 0),
            )
            yield gauge(
                "lipsync_tts_circuit_opened", "How often the remote TTS circuit breaker opened", breaker.opened_count
            )
        store = getattr(jobs, "store", None)
        if store is not None and hasattr(store, "status_counts"):
            counts = store.status_counts()
            yield gauge(
                "lipsync_jobs",
                "Jobs known to the queue, by status",
                samples=[({"status": status}, n) for status, n in counts.items()],
            )
            yield gauge("lipsync_queue_depth", "Jobs waiting to run", counts.get("queued", 0))
        yield gauge("lipsync_sync_renders_active", "Synchronous /api/generate renders running", slots.active)
        yield gauge("lipsync_sync_render_slots", "Synchronous renders allowed at once", slots.count)
        yield gauge(
            "lipsync_shutting_down", "1 once a graceful shutdown began", 1 if lifecycle.stopping.is_set() else 0
        )

    metrics.add_state(state)
