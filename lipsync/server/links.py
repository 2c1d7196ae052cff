"""The URLs of a job, as the API answers them and its webhook carries them."""

from __future__ import annotations


def job_links(job_id: str) -> dict:
    """``status_url``, ``events_url``, ``video_url`` and ``stream_url`` of ``job_id`` (relative)."""
    base = f"/api/jobs/{job_id}"
    return {"status_url": base, "events_url": f"{base}/events", "video_url": f"{base}/video",
            "stream_url": f"{base}/stream"}
