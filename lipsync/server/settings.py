"""The HTTP server's configuration: listening address, protection, logging, shutdown, workers.

Read once from the environment like the pipeline's ``lipsync.settings.Settings`` (same
rules, names in README) and kept in ``app.config["SERVER"]``. Nothing below
``lipsync.server`` knows these exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from lipsync.settings import EnvSettings, SettingsError

LOG_FORMATS = ("json", "text")
SERVER_ROLES = ("app", "stream")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
RATE_LIMIT_OFF = ("", "off", "none", "0", "false", "no")
RATE_LIMIT_STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")


@dataclass(frozen=True)
class ServerSettings(EnvSettings):
    # --- listening
    host: str = "0.0.0.0"
    port: int = 3000
    # --- protection (README "Security")
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # API_KEYS, comma-separated; () = no auth
    rate_limit: str = "30/minute"           # POST /api/generate and /api/jobs per client; "off" disables
    rate_limit_read: str = "600/minute"     # the other protected /api routes (job status, video...) per client
    rate_limit_storage_uri: str = field(default="memory://", repr=False)  # or REDIS_URL; redis:// shares limits
    trusted_proxies: int = 0                # proxies in front that append to X-Forwarded-For
    cors_origins: tuple[str, ...] = ()      # CORS_ORIGINS, comma-separated; () = same-origin only
    max_sync_renders: int = 2               # POST /api/generate renders at once; more wait, then 503 busy
    sync_wait_seconds: float = 10.0         # how long a sync request waits for a render slot
    metrics_public: bool = False            # serve /metrics without an API key even when API_KEYS is set
    # --- operations (README "Operations")
    log_format: str = "json"                # json: one JSON object per line; text: human-readable
    log_level: str = "INFO"
    log_text: bool = False                  # put the request text (first 200 characters) in its log line
    shutdown_grace_seconds: float = 30.0    # on SIGTERM: time for the running job/renders to finish
    max_connections: int = 256              # python app.py: connections served at once; more get 503
    # --- gunicorn (lipsync/server/gunicorn_conf.py)
    gpu_count: int = 0                      # > 0: one worker per GPU, each pinned to its card
    gunicorn_workers: int = 0               # 0: max(1, GPU_COUNT)
    gunicorn_threads: int = 4
    gunicorn_timeout: int = 600             # long texts take minutes on a CPU
    bind: str = ""                          # gunicorn's address instead of HOST:PORT (e.g. unix:/run/app.sock)
    server_role: str = "app"                # app: everything; stream: only follows jobs (SSE, /stream), no models
    stream_connections: int = 1000          # the stream role's connections per worker (gevent)
    # --- the production stack (make serve: nginx in front of gunicorn; lipsync/server/stack.py)
    tls_cert: str | None = None             # PEM certificate (chain) for https on PORT; with TLS_KEY
    tls_key: str | None = field(default=None, repr=False)
    nginx_binary: str = "nginx"
    # --- the local cluster (make cluster: redis + nginx + web nodes + workers; lipsync/server/cluster.py)
    cluster_dir: str = ".cache/cluster"     # pid file, logs and Redis's data of `make cluster`
    cluster_web_nodes: int = 2              # web processes behind nginx
    cluster_workers: int = 2                # `python -m lipsync worker` processes
    redis_binary: str = "redis-server"

    LIST_FIELDS: ClassVar[frozenset[str]] = frozenset({"api_keys", "cors_origins"})

    @classmethod
    def _fallbacks(cls, env: Mapping[str, str], values: dict) -> dict:
        redis_url = (env.get("REDIS_URL") or "").strip()
        if "rate_limit_storage_uri" not in values and redis_url:
            return {"rate_limit_storage_uri": redis_url}
        return {}

    def validate(self) -> None:
        """Raise ``SettingsError`` naming the first unusable value."""
        self.check_positive("port", "max_sync_renders", "gunicorn_threads", "gunicorn_timeout")
        self.check_non_negative("trusted_proxies", "sync_wait_seconds", "shutdown_grace_seconds", "gpu_count",
                                "gunicorn_workers")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}")
        self.check_choices({"log_format": LOG_FORMATS, "server_role": SERVER_ROLES})
        self.check_positive("max_connections", "stream_connections", "cluster_web_nodes", "cluster_workers")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("TLS_CERT and TLS_KEY go together: set both for https, or neither")
        for name in ("rate_limit", "rate_limit_read"):
            parse_rate_limit(getattr(self, name), name)
        if self.rate_limit_storage_uri.split("://", 1)[0] not in RATE_LIMIT_STORAGE_SCHEMES:
            raise SettingsError("RATE_LIMIT_STORAGE_URI must be memory:// or a redis:// URL")
        for origin in self.cors_origins:
            if origin != "*" and not (
                origin.startswith(("http://", "https://")) and "/" not in origin.split("://", 1)[1]
            ):
                raise SettingsError(f"CORS_ORIGINS: {origin!r} is not an origin like https://example.com")
        for key in self.api_keys:
            if not key or any(ch.isspace() for ch in key) or not key.isprintable():
                raise SettingsError("API_KEYS must be printable keys without spaces, separated by commas")

    @property
    def worker_count(self) -> int:
        return self.gunicorn_workers or max(1, self.gpu_count)


def parse_rate_limit(spec: str, name: str = "rate_limit") -> list:
    """``spec`` ("30/minute", "5/second;100/hour") as ``limits`` items; [] when it says off."""
    if spec is None or spec.strip().lower() in RATE_LIMIT_OFF:
        return []
    from limits import parse_many

    try:
        return list(parse_many(spec))
    except ValueError:
        raise SettingsError(
            f"{name.upper()}={spec!r} is not a rate limit like '30/minute' or '5/second;100/hour' (or 'off')"
        ) from None
