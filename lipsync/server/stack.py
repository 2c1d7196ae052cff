"""The production stack, one command: ``make serve`` (``python -m lipsync.server.stack``).

    clients ──> nginx :PORT (http, or https with TLS_CERT/TLS_KEY)
                 ├─ /api/jobs/<id>/events, /api/jobs/<id>/stream ──> gunicorn SERVER_ROLE=stream
                 │        one gevent worker: thousands of followers cost greenlets, not threads
                 └─ everything else ──> gunicorn SERVER_ROLE=app
                          gthread workers (one per GPU): renders, jobs, health, downloads

Why this shape: a thread-per-connection server is exhausted by a few clients that hold
connections open (SSE, a live stream, slowloris). nginx reads every request header and body
completely, with timeouts, before gunicorn sees it (a slow client costs an nginx connection,
not a worker thread), and buffers responses to slow readers. The long-lived responses go to
a gevent worker, where waiting is cheap; the renders and health probes keep their threads.
Both gunicorns run the same app (``create_app``); the stream one loads no model and reads the
shared job store and files (the same way any number of web nodes would).

SIGTERM or Ctrl-C drains: both gunicorns get SIGTERM (new work is refused with 503
``shutting_down`` while running jobs and renders finish, up to SHUTDOWN_GRACE_SECONDS), then
nginx quits gracefully. If any of the three dies, the others are stopped and the stack exits
non-zero, so a supervisor (systemd, Docker) restarts it whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from lipsync.server.observability import configure_logging
from lipsync.server.settings import ServerSettings
from lipsync.settings import Settings, SettingsError

log = logging.getLogger("lipsync.stack")

# nginx's own answers (malformed requests, bodies over the limit, a slow client, gunicorn
# unreachable) in the API's JSON error shape; gunicorn's answers pass through untouched.
NGINX_ERRORS = {
    400: ("bad_request", "the request is malformed"),
    408: ("request_timeout", "the request was not sent in time"),
    413: ("payload_too_large", "the request body is larger than the limit of {limit} bytes"),
    414: ("uri_too_long", "the request line is too long"),
    431: ("headers_too_large", "the request headers are too large"),
    494: ("headers_too_large", "the request headers are too large"),
    502: ("unavailable", "the service is not reachable; try again shortly"),
    503: ("unavailable", "the service is not reachable; try again shortly"),
    504: ("timeout", "the service did not answer in time"),
}

NGINX_CONF = """\
# Written by lipsync/server/stack.py at every start; edit the template there, not this file.
worker_processes {worker_processes};
pid {run_dir}/nginx.pid;
error_log stderr warn;
daemon off;
{user}
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}

http {{
    access_log off;  # the app writes one JSON line per request (lipsync.access)
    server_tokens off;
    default_type application/octet-stream;
    client_body_temp_path {run_dir}/client_body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;

    # Slow clients (slowloris): the headers and the body must keep coming; idle connections go.
    client_header_timeout 10s;
    client_body_timeout 10s;
    send_timeout 30s;
    keepalive_timeout 15s;
    reset_timedout_connection on;
    client_header_buffer_size 4k;
    large_client_header_buffers 4 16k;
    client_max_body_size {max_body};
    client_body_buffer_size 1m;

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    # One hop, set here: a client cannot forge it (the app trusts exactly one proxy).
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_request_buffering on;   # gunicorn sees a request only once it is complete
    proxy_buffering on;           # and hands a response to nginx at once, however slow the reader
    proxy_connect_timeout 5s;
    proxy_send_timeout 60s;
    proxy_read_timeout {read_timeout}s;

    map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}

    upstream lipsync_app {{ {app_servers} keepalive 16; }}
    upstream lipsync_stream {{ {stream_servers} keepalive 64; }}

    server {{
        listen {listen};
{tls}
        # Following a job: long-lived, passed through unbuffered, served by the gevent worker.
        location ~ ^/api/jobs/[^/]+/(events|stream)$ {{
            proxy_pass http://lipsync_stream;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 330s;  # a follow ends after 300 s; SSE sends a heartbeat every 15 s
        }}
        # A live session's WebSocket and endless video: on the app process that renders it,
        # unbuffered, upgraded to WebSocket where asked (headers repeated: a location's own
        # proxy_set_header replaces all inherited ones).
        location ~ ^/api/sessions/[^/]+/(ws|video)$ {{
            proxy_pass http://lipsync_app;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 3700s;
        }}
        location / {{
            proxy_pass http://lipsync_app;
        }}
{error_pages}
    }}
}}
"""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen


def render_nginx_conf(server: ServerSettings, settings: Settings, run_dir: str, app_socket: str | list[str],
                      stream_socket: str | list[str]) -> str:
    """nginx.conf for the stack: listening on ``server.port`` (https when TLS is set), proxying to
    the two gunicorn sockets, temp files under ``run_dir``.

    Either upstream may also be a list of nginx ``server`` addresses (``127.0.0.1:8001``,
    ``unix:/path``): the cluster (``lipsync.server.cluster``) balances over its web nodes."""
    listen = f"{server.host}:{server.port}" if server.host not in ("", "0.0.0.0") else str(server.port)
    tls = ""
    if server.tls_cert:
        listen += " ssl"
        tls = (f"        ssl_certificate {server.tls_cert};\n"
               f"        ssl_certificate_key {server.tls_key};\n"
               "        ssl_protocols TLSv1.2 TLSv1.3;\n"
               "        ssl_session_cache shared:lipsync_tls:10m;\n")
    max_body = settings.max_upload_bytes + 1024 * 1024  # the upload plus multipart overhead, as the app allows
    pages = []
    for status, (code, message) in NGINX_ERRORS.items():
        body = json.dumps({"error": message.format(limit=max_body), "code": code})
        pages.append(f"        error_page {status} /__lipsync_error/{status};\n"
                     f"        location = /__lipsync_error/{status} {{\n"
                     f"            internal;\n"
                     f"            default_type application/json;\n"
                     f"            return {status} '{body}';\n"
                     f"        }}")
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    return NGINX_CONF.format(worker_processes=1, run_dir=run_dir, user=user, max_body=max_body,
                             read_timeout=server.gunicorn_timeout + 10, app_servers=_upstream(app_socket),
                             stream_servers=_upstream(stream_socket), listen=listen, tls=tls,
                             error_pages="\n".join(pages))


def _upstream(servers: str | list[str]) -> str:
    """nginx ``server`` lines: a socket path, or a list of addresses (a failed one is skipped for 5 s)."""
    if isinstance(servers, str):
        return f"server unix:{servers};"
    return " ".join(f"server {address} max_fails=1 fail_timeout=5s;" for address in servers)


class Stack:
    """nginx and the two gunicorns as child processes; ``start()``, then ``wait()`` or ``stop()``."""

    def __init__(self, server: ServerSettings, settings: Settings, environ: dict | None = None):
        self.server = server
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.run_dir = tempfile.mkdtemp(prefix="lipsync-stack-")
        os.chmod(self.run_dir, 0o755)  # nginx's workers (nobody) reach the sockets through it
        self.app_socket = os.path.join(self.run_dir, "app.sock")
        self.stream_socket = os.path.join(self.run_dir, "stream.sock")
        self.children: list[_Child] = []
        self.stopping = threading.Event()

    def nginx_binary(self) -> str:
        found = shutil.which(self.server.nginx_binary) or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
        if found is None:
            raise SettingsError(f"nginx not found ({self.server.nginx_binary!r}): install Debian's package "
                                "(apt-get install nginx) or set NGINX_BINARY")
        return found

    def start(self, timeout: float = 60.0) -> None:
        """Start both gunicorns, wait for their sockets, then nginx; raise if one fails to start."""
        nginx = self.nginx_binary()
        for role, sock in (("app", self.app_socket), ("stream", self.stream_socket)):
            env = {**self.environ, "SERVER_ROLE": role, "BIND": f"unix:{sock}", "TRUSTED_PROXIES": "1"}
            cmd = [sys.executable, "-m", "gunicorn", "-c", "python:lipsync.server.gunicorn_conf"]
            # own process group: a Ctrl-C reaches the stack only, which then drains them in order
            self.children.append(_Child(f"gunicorn-{role}", subprocess.Popen(cmd, env=env, process_group=0)))
        deadline = time.monotonic() + timeout
        for sock in (self.app_socket, self.stream_socket):
            while not _accepts(sock):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not open {sock} within {timeout:.0f} s")
                time.sleep(0.1)
        conf = os.path.join(self.run_dir, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(render_nginx_conf(self.server, self.settings, self.run_dir, self.app_socket,
                                      self.stream_socket))
        subprocess.run([nginx, "-t", "-q", "-p", self.run_dir, "-c", conf], check=True)
        nginx_proc = subprocess.Popen([nginx, "-p", self.run_dir, "-c", conf], process_group=0)
        self.children.append(_Child("nginx", nginx_proc))
        scheme = "https" if self.server.tls_cert else "http"
        log.info("stack up: %s://localhost:%d (nginx -> gunicorn app + stream)", scheme, self.server.port)

    def wait(self) -> int:
        """Until ``stop()`` or a child's death (then the others are stopped): the exit status."""
        while not self.stopping.is_set():
            for child in self.children:
                if child.proc.poll() is not None:
                    log.error("%s exited with %s; stopping the stack", child.name, child.proc.returncode)
                    self.stop()
                    return 1
            self.stopping.wait(0.5)
        return 0

    def stop(self) -> None:
        """Drain: gunicorns first (SIGTERM: running work finishes), then nginx (SIGQUIT: graceful)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        grace = self.server.shutdown_grace_seconds + 25
        gunicorns = [c for c in self.children if c.name.startswith("gunicorn")]
        for child in gunicorns:
            _signal(child.proc, signal.SIGTERM)
        for child in gunicorns:
            _wait_or_kill(child.proc, grace)
        for child in self.children:
            if child.name == "nginx":
                _signal(child.proc, signal.SIGQUIT)
                _wait_or_kill(child.proc, 15)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("stack stopped")

    def _check_alive(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode} while starting")


def _accepts(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _signal(proc: subprocess.Popen, signum: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    """Read the settings once, start the stack, serve until SIGTERM/SIGINT."""
    try:
        settings, server = Settings.from_env(), ServerSettings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(server.log_level, server.log_format)
    stack = Stack(server, settings)

    def on_signal(signum, frame):
        threading.Thread(target=stack.stop, name="stack-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
    except (RuntimeError, SettingsError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    status = stack.wait()
    # stop() may still be running in the signal's thread: let it finish the drain
    for child in stack.children:
        child.proc.wait()
    return status


if __name__ == "__main__":
    sys.exit(main())
