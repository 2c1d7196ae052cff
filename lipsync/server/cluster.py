"""A whole cluster on one machine: ``make cluster`` / ``make cluster-stop``
(``python -m lipsync.server.cluster start|stop|status``).

    clients ──> nginx :PORT ──(round robin)──> web 1, web 2 (gunicorn, QUEUE_URL: submit, read, follow)
                                                      │
                redis-server (loopback, append-only file) <── RQ ──> worker 1, worker 2
                                                                     (python -m lipsync worker)
                OUTPUT_DIR: the shared storage (results, live streams, avatars) of every process

The same topology as ``docs/cluster/compose.yaml`` and as separate machines: only Redis's
address and the mounted OUTPUT_DIR connect the processes. Everything runs in the background
in its own session; ``CLUSTER_DIR`` (default ``.cache/cluster``) holds ``cluster.json`` (pids,
ports), ``logs/<process>.log`` and Redis's data, so ``stop`` works from another shell.
Stopping drains: web nodes and workers get SIGTERM (running jobs finish), then nginx and Redis.
The tests drive the same class (``Cluster``) with free ports and temporary folders.
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
import time
import urllib.request

from lipsync.server.observability import configure_logging
from lipsync.server.settings import ServerSettings
from lipsync.server.stack import render_nginx_conf
from lipsync.settings import Settings, SettingsError

log = logging.getLogger("lipsync.cluster")

STATE_NAME = "cluster.json"


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Redis, workers, web nodes and nginx as background processes described in ``cluster.json``.

    ``environ``: the environment every process gets (settings: OUTPUT_DIR, ENGINE, ...).
    """

    def __init__(self, server: ServerSettings, settings: Settings, environ: dict | None = None):
        self.server = server
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.dir = os.path.abspath(server.cluster_dir)
        self.state_path = os.path.join(self.dir, STATE_NAME)
        self.procs: dict[str, subprocess.Popen] = {}  # the children started by this process
        self.state: dict = {"pids": {}, "web": {}}

    # ------------------------------------------------------------ start
    def start(self, timeout: float = 120.0) -> None:
        """Start everything, wait until nginx answers health; raise (having stopped what started) if not."""
        if self.running():
            raise RuntimeError(f"a cluster already runs from {self.dir} (stop it first: make cluster-stop)")
        nginx = self._binary(self.server.nginx_binary, "nginx", "apt-get install nginx")
        self._binary(self.server.redis_binary, "redis-server", "apt-get install redis-server")
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "redis"), exist_ok=True)
        self.state = {"pids": {}, "web": {}, "port": self.server.port, "redis_port": free_port(),
                      "nginx_dir": tempfile.mkdtemp(prefix="lipsync-cluster-nginx-")}
        self.state["redis_url"] = f"redis://127.0.0.1:{self.state['redis_port']}/0"
        try:
            self.spawn("redis")
            _wait(lambda: self._redis_ping(), timeout, "redis-server did not answer")
            for i in range(1, self.server.cluster_workers + 1):
                self.spawn(f"worker-{i}")
            for i in range(1, self.server.cluster_web_nodes + 1):
                self.state["web"][f"web-{i}"] = free_port()
                self.spawn(f"web-{i}")
            for name, port in self.state["web"].items():
                _wait(lambda p=port: _healthy(f"http://127.0.0.1:{p}"), timeout, f"{name} did not become ready",
                      alive=lambda n=name: self._check_alive(n))
            os.chmod(self.state["nginx_dir"], 0o755)  # nginx's workers (nobody, when root) use it
            conf = os.path.join(self.state["nginx_dir"], "nginx.conf")
            addresses = [f"127.0.0.1:{port}" for port in self.state["web"].values()]
            with open(conf, "w", encoding="utf-8") as f:
                f.write(render_nginx_conf(self.server, self.settings, self.state["nginx_dir"], addresses, addresses))
            subprocess.run([nginx, "-t", "-q", "-p", self.state["nginx_dir"], "-c", conf], check=True)
            self.spawn("nginx", [nginx, "-p", self.state["nginx_dir"], "-c", conf])
            _wait(lambda: _healthy(self.url), timeout, "nginx did not answer", alive=lambda: self._check_alive("nginx"))
        except BaseException:
            self.stop()
            raise
        log.info("cluster up: %s (nginx -> %d web, %d workers, redis %s); logs in %s", self.url,
                 len(self.state["web"]), self.server.cluster_workers, self.state["redis_url"],
                 os.path.join(self.dir, "logs"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.state['port']}"

    def web_url(self, name: str) -> str:
        """A web node's own address (tests reach one node past nginx)."""
        return f"http://127.0.0.1:{self.state['web'][name]}"

    def command(self, name: str) -> tuple[list[str], dict]:
        """The command line and environment of process ``name`` (redis, worker-N, web-N)."""
        env = {**self.environ, "QUEUE_URL": self.state["redis_url"]}
        env.setdefault("RATE_LIMIT_STORAGE_URI", self.state["redis_url"])  # limits shared by the web nodes
        if name == "redis":
            return [self._binary(self.server.redis_binary, "redis-server", ""), "--port",
                    str(self.state["redis_port"]), "--bind", "127.0.0.1", "--dir", os.path.join(self.dir, "redis"),
                    # the append-only file, fsynced every second: a restart keeps queued jobs too
                    "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""], env
        if name.startswith("worker-"):
            return [sys.executable, "-m", "lipsync", "worker"], env
        env.update(SERVER_ROLE="app", BIND=f"127.0.0.1:{self.state['web'][name]}", TRUSTED_PROXIES="1",
                   GUNICORN_WORKERS="1")
        env.setdefault("GUNICORN_THREADS", "16")  # followers (SSE, /stream) hold a thread each
        return [sys.executable, "-m", "gunicorn", "-c", "python:lipsync.server.gunicorn_conf"], env

    def spawn(self, name: str, cmd: list[str] | None = None) -> subprocess.Popen:
        """Start (or start again) process ``name`` in its own session, logging to ``logs/<name>.log``."""
        argv, env = self.command(name) if cmd is None else (cmd, self.environ)
        with open(os.path.join(self.dir, "logs", f"{name}.log"), "ab") as logfile:
            proc = subprocess.Popen(argv, env=env, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs[name] = proc
        self.state["pids"][name] = proc.pid
        self._save()
        return proc

    # ------------------------------------------------------------ stop
    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: web nodes and workers (SIGTERM: running jobs finish, up to ``grace`` s),
        then nginx (graceful quit) and Redis (which writes its data)."""
        if not self.state.get("pids"):
            self.load()
        pids = dict(self.state.get("pids") or {})
        grace = self.server.shutdown_grace_seconds + 30 if grace is None else grace
        order = ([n for n in pids if n.startswith(("web-", "worker-"))], ["nginx"], ["redis"])
        for names, signum in zip(order, (signal.SIGTERM, signal.SIGQUIT, signal.SIGTERM)):
            for name in names:
                if name in pids:
                    self._signal(name, signum)
            for name in names:
                if name in pids:
                    self._wait_gone(name, grace)
        if self.state.get("nginx_dir"):
            shutil.rmtree(self.state["nginx_dir"], ignore_errors=True)
        self.state["pids"] = {}
        _unlink(self.state_path)

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to process ``name`` (tests: SIGKILL a worker, SIGTERM one, stop Redis)."""
        self._signal(name, signum)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None:
            return proc.poll() is None
        pid = self.state.get("pids", {}).get(name)
        return pid is not None and _pid_alive(pid)

    def running(self) -> bool:
        """True when ``cluster.json`` names a process that still runs."""
        self.load()
        return any(self.alive(name) for name in self.state.get("pids", {}))

    def load(self) -> None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                self.state = json.load(f)
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------ helpers
    def _save(self) -> None:
        temp = self.state_path + ".tmp"
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=2)
        os.replace(temp, self.state_path)

    def _signal(self, name: str, signum: int) -> None:
        pid = self.state.get("pids", {}).get(name)
        if pid is not None and self.alive(name):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _wait_gone(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive(name):
            log.warning("%s did not stop within %.0f s; killed", name, timeout)
            self._signal(name, signal.SIGKILL)
            proc = self.procs.get(name)
            if proc is not None:
                proc.wait(10)

    def _check_alive(self, name: str) -> None:
        if not self.alive(name):
            tail = _tail(os.path.join(self.dir, "logs", f"{name}.log"))
            raise RuntimeError(f"{name} exited while starting; its log ends:\n{tail}")

    def _redis_ping(self) -> bool:
        self._check_alive("redis")
        try:
            with socket.create_connection(("127.0.0.1", self.state["redis_port"]), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _binary(self, configured: str, name: str, install: str) -> str:
        found = shutil.which(configured) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/usr/bin")
        if found is None:
            raise SettingsError(f"{name} not found ({configured!r}): {install}")
        return found


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/api/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait(predicate, timeout: float, message: str, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{message} within {timeout:.0f} s")
        time.sleep(0.2)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def _tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``start`` (in the background), ``stop`` or ``status`` the local cluster."""
    action = (argv if argv is not None else sys.argv[1:] or ["status"])[0]
    try:
        settings, server = Settings.from_env(), ServerSettings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(server.log_level, "text")
    cluster = Cluster(server, settings)
    if action == "start":
        try:
            cluster.start()
        except (RuntimeError, SettingsError, subprocess.CalledProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"cluster up on {cluster.url}: {', '.join(cluster.state['pids'])}; "
              f"logs in {os.path.join(cluster.dir, 'logs')}; stop with: make cluster-stop")
        return 0
    if action == "stop":
        running = cluster.running()
        cluster.stop()
        print("cluster stopped" if running else "no cluster was running")
        return 0
    if action == "status":
        running = cluster.running()
        for name, pid in cluster.state.get("pids", {}).items():
            print(f"{name:10} pid {pid:7} {'running' if cluster.alive(name) else 'stopped'}")
        return 0 if running else 1
    print("usage: python -m lipsync.server.cluster start|stop|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
