"""This process's per-request temporary folders, and the sweep of those left by dead processes.

A folder is named ``<kind>-<pid>.<start ticks>.<host>-<random>`` under the service's temporary
root (``LipsyncService.temp_root()``), so a restarted process, or another gunicorn worker
sharing the root, can tell whether the process that made it still runs. ``<host>`` (a digest
of the host name) keeps machines sharing one OUTPUT_DIR (the cluster) from judging each
other's process ids.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile

log = logging.getLogger(__name__)

# http: a synchronous render's output; up: an uploaded recording being decoded.
KINDS = ("http", "up")


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _process_tag() -> str:
    """``<pid>.<start time>.<host>``: names this process's temporary folders, unique even across
    container restarts where the pid repeats, and across machines sharing the folder."""
    return f"{os.getpid()}.{_start_ticks(os.getpid()) or 0}.{HOST_TAG}"


PROCESS_TAG = _process_tag()
_TEMP_NAME = re.compile(rf"(?:{'|'.join(KINDS)})-(\d+)\.(\d+)(?:\.([0-9a-f]{{8}}))?-")


def process_temp_dir(kind: str, root: str) -> tempfile.TemporaryDirectory:
    """A new folder under ``root`` named for this process (``kind``: one of ``KINDS``).

    Use it as a context manager (it yields the folder's path and removes it at the end);
    ``sweep_stale_temp`` removes it should the process die first."""
    if kind not in KINDS:
        raise ValueError(f"unknown temporary folder kind {kind!r}")
    return tempfile.TemporaryDirectory(prefix=f"{kind}-{PROCESS_TAG}-", dir=root)


def sweep_stale_temp(root: str) -> int:
    """Remove per-request folders left by processes that died (SIGKILL, power loss); returns how many.

    Folders of live processes (other gunicorn workers sharing the folder) are kept."""
    removed = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None:
            continue
        pid, ticks, host = int(match.group(1)), int(match.group(2)), match.group(3)
        if host is not None and host != HOST_TAG:
            continue  # another machine's (a cluster node sharing OUTPUT_DIR): its pids mean nothing here
        if pid == os.getpid() and f"{pid}.{ticks}.{HOST_TAG}" == PROCESS_TAG:
            continue
        alive = _start_ticks(pid)
        if alive is not None and (ticks == 0 or alive == ticks):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed += 1
    if removed:
        log.warning("removed %d temporary folder(s) left by stopped processes", removed)
    return removed
