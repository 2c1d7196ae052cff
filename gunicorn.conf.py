"""Production server: `gunicorn -c gunicorn.conf.py`.

One worker per GPU (each worker preloads its own model and owns one card);
threads serve health probes and queue requests while the engine is busy.
"""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '3000')}"
wsgi_app = "app:create_app()"
worker_class = "gthread"
gpu_count = int(os.environ.get("GPU_COUNT", "0"))
workers = int(os.environ.get("GUNICORN_WORKERS", str(max(1, gpu_count))))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "600"))   # long texts take minutes on a CPU
graceful_timeout = 60
preload_app = False  # CUDA must be initialised inside each worker, never in the master
accesslog = "-"


def post_fork(server, worker):
    """Pin each worker to its own GPU when GPU_COUNT is set."""
    if gpu_count > 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str((worker.age - 1) % gpu_count)
