"""Finding and running the ffmpeg binary.

A system ffmpeg on PATH wins (distribution builds are usually newer and may
have more codecs); otherwise the static binary shipped by the
``imageio-ffmpeg`` wheel is used, so a plain ``pip install`` is enough.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import select
import shutil
import subprocess
import threading
from collections.abc import Iterable

from lipsync.errors import MediaError

log = logging.getLogger(__name__)

# What an error message shown to a client must not carry from ffmpeg's stderr: the memory
# address in its "[wav @ 0x5621...]" prefixes, and file names (working folders, the server's
# layout), absolute or relative. They stay in the log.
_ADDRESS = re.compile(r"\s*@\s*0x[0-9a-fA-F]+")
_PATH_LIKE = re.compile(r"[^\s'\"|,;()\[\]<>]*/[^\s'\"|,;()\[\]<>]*")
FILE_WORD = "<file>"

_explicit_binary: str | None = None


def use_binary(path: str | None) -> None:
    """Use the ffmpeg at ``path`` from now on in this process (the ``FFMPEG_BINARY`` setting);
    None goes back to the search."""
    global _explicit_binary
    _explicit_binary = path or None
    ffmpeg_exe.cache_clear()


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: the one given to ``use_binary``, else the search."""
    if _explicit_binary:
        return _explicit_binary
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise MediaError("ffmpeg not found: install it or `pip install imageio-ffmpeg`") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=8)
def _encoders(binary: str) -> frozenset[str]:
    try:
        out = subprocess.run([binary, "-hide_banner", "-encoders"], capture_output=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    # Lines such as " V....D libx264  libx264 H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10"
    return frozenset(m.group(1) for m in re.finditer(r"^ [VAS][.A-Z]{5} (\S+)", out, re.MULTILINE))


def has_encoder(name: str) -> bool:
    """Whether this process's ffmpeg (``ffmpeg_exe``) was built with the encoder ``name``
    (e.g. ``libopenh264``). Asked once per binary."""
    return name in _encoders(ffmpeg_exe())


def run_ffmpeg(args: list[str], *, input: bytes | None = None, timeout: float = 300.0,
               error: type[Exception] = MediaError, what: str = "ffmpeg failed") -> bytes:
    """Run ``ffmpeg <args>`` and return its stdout.

    On a non-zero exit raises ``error`` whose message ends with the last lines
    of ffmpeg's stderr; on timeout the process is killed first.
    """
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what}: ffmpeg timed out after {timeout:.0f} s") from exc
    except OSError as exc:  # the binary itself is missing or not executable: our fault, not the input's
        raise MediaError(f"cannot start ffmpeg ({cmd[0]}): {exc.strerror or exc}") from None
    if proc.returncode != 0:
        log_stderr(what, proc.returncode, proc.stderr)
        paths = [a for a in args if os.sep in a]
        raise error(f"{what}: {stderr_tail(proc.stderr, paths=paths)}")
    return proc.stdout


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """``proc.wait(timeout)`` that returns as ``proc`` exits; raises ``subprocess.TimeoutExpired``.

    ``Popen.wait`` with a timeout checks in sleeps that double up to 50 ms, so it sees an exit
    up to 50 ms late, on the critical path of every request (four requests at once on an H100
    waited 32 ms for each join; docs/PERFORMANCE.md, "Issue 14, seventh round"). A pidfd (Linux 5.3+)
    becomes readable at the exit itself; elsewhere this is ``proc.wait(timeout)``."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or already reaped by another wait
        return proc.wait(timeout=timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000.0):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait()


def log_stderr(what: str, returncode: int | None, stderr: bytes) -> None:
    """ffmpeg's whole stderr in the server log (warning): the client gets ``stderr_tail``'s
    sanitised last lines only."""
    log.warning("%s: ffmpeg exited with %s: %s", what, returncode,
                stderr.decode("utf-8", "replace").strip()[-8000:] or "no error output")


def stderr_tail(stderr: bytes, lines: int = 5, paths: Iterable[str] = ()) -> str:
    """The last ``lines`` non-empty lines of an ffmpeg stderr, as one string fit for a client:
    memory addresses dropped, file names (``paths`` as given, any path-like word) replaced by
    ``<file>`` (``sanitize_stderr``)."""
    text = sanitize_stderr(stderr.decode("utf-8", "replace"), paths).strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:] if line.strip()) or "no error output"


def sanitize_stderr(text: str, paths: Iterable[str] = ()) -> str:
    """``text`` without the ``@ 0x...`` addresses of ffmpeg's log prefixes (``[wav @ 0x5621ab]``
    becomes ``[wav]``) and with ``<file>`` for each of ``paths`` (as given and absolute: they may
    hold spaces) and for every other word with a ``/`` and a letter in it (a path, absolute or
    relative; ``1/25`` stays)."""
    known = {p for path in paths if path for p in (path, os.path.abspath(path))}
    for path in sorted(known, key=len, reverse=True):
        text = text.replace(path, FILE_WORD)
    text = _ADDRESS.sub("", text)
    return _PATH_LIKE.sub(_path_word, text)


def _path_word(match: re.Match) -> str:
    word = match.group()
    core = word.rstrip(".:")
    if not re.search(r"[^\W\d_]", core):  # no letter: a ratio (1/25), not a file name
        return word
    return FILE_WORD + word[len(core):]


def grow_pipe(pipe) -> None:
    """Make a pipe's kernel buffer 1 MiB (Linux; best effort): a 2 MB frame then goes to ffmpeg in
    2-3 writes instead of 32, each of which a feeder thread makes holding the GIL."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError, ValueError):
        pass


class InputPipe:
    """An extra input of an ffmpeg child (``-i`` ``url``, e.g. the speech beside frames on stdin),
    fed in order by its own thread from what ``put`` is given.

    An anonymous pipe, not a named FIFO: ffmpeg opens it at once (a FIFO's open blocks until a
    writer comes, so a parent killed before then left its ffmpeg blocked forever), and ffmpeg sees
    the end of the input when this process closes it or dies. Spawn the child with
    ``pass_fds=pipe.pass_fds``, then call ``started()`` (or ``discard()`` if the spawn failed);
    ``end()`` when all is put, ``wait()`` for it to be written.
    A write after the child died fails at once (EPIPE), which ends the thread."""

    def __init__(self, name: str):
        self._read, write = os.pipe()
        self.url = f"pipe:{self._read}"
        self.pass_fds = (self._read,)
        self._file = os.fdopen(write, "wb")
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._thread = threading.Thread(target=self._feed, name=name, daemon=True)

    def started(self) -> None:
        """The child has its copy of the read end: drop ours (so a dead child means EPIPE) and feed."""
        os.close(self._read)
        self._thread.start()

    def discard(self) -> None:
        """The child was never started: close both ends."""
        os.close(self._read)
        self._file.close()

    def put(self, data: bytes) -> None:
        """Queue ``data`` for the child (never blocks)."""
        self._queue.put(data)

    def end(self) -> None:
        """End the input after what was queued (never blocks)."""
        self._queue.put(None)

    def wait(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for the thread to have written all and closed the pipe, after
        ``end()`` (at once where the child is dead: its writes fail)."""
        self._thread.join(timeout)

    def _feed(self) -> None:
        try:
            while (chunk := self._queue.get()) is not None:
                self._file.write(chunk)
                self._file.flush()  # a live stream's sound goes at once
        except (OSError, ValueError):
            pass  # the child went away; its exit status and stderr say why
        finally:
            try:
                self._file.close()
            except OSError:
                pass
