"""Asynchronous generation jobs: queue, persistent records, expiry and signed webhooks.

    from lipsync.jobs import JobRequest, LocalJobQueue

    jobs = LocalJobQueue(service, settings)   # service: a loaded LipsyncService
    jobs.start()
    job = jobs.submit(JobRequest(text="Hello", language="en", callback_url="https://example.com/hook"))
    for state in jobs.events(job.id, timeout=60):
        print(state["status"], state["stage"], state["progress"])
    path = jobs.result_path(job.id)           # the MP4 once done
    jobs.stop()

No Flask here: the web layer maps these calls to /api/jobs routes.
"""

from lipsync.errors import QueueFullError
from lipsync.jobs.live import follow_live, open_live
from lipsync.jobs.local import LocalJobQueue
from lipsync.jobs.queue import INTERRUPTED_ERROR, STAGE_SPANS, Job, JobQueue, JobRequest
from lipsync.jobs.store import FINAL_STATUSES, STATUSES, JobStore, new_job_id, valid_job_id
from lipsync.jobs.webhooks import (
                                   SIGNATURE_HEADER,
                                   TIMESTAMP_HEADER,
                                   WebhookSender,
                                   sign,
                                   validate_callback_url,
                                   verify_signature,
)

__all__ = [
    "FINAL_STATUSES", "INTERRUPTED_ERROR", "Job", "JobQueue", "JobRequest", "JobStore", "LocalJobQueue",
    "QueueFullError", "SIGNATURE_HEADER", "STAGE_SPANS", "STATUSES", "TIMESTAMP_HEADER", "WebhookSender",
    "follow_live", "new_job_id", "open_live", "sign", "validate_callback_url", "valid_job_id", "verify_signature",
]
