"""Finding and running the ffmpeg binary.

A system ffmpeg on PATH wins (distribution builds are usually newer and may
have more codecs); otherwise the static binary shipped by the
``imageio-ffmpeg`` wheel is used, so a plain ``pip install`` is enough.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

from lipsync.errors import MediaError

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
        raise error(f"{what}: {stderr_tail(proc.stderr)}")
    return proc.stdout


def stderr_tail(stderr: bytes, lines: int = 5) -> str:
    """The last ``lines`` non-empty lines of an ffmpeg stderr, as one string."""
    text = stderr.decode("utf-8", "replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:] if line.strip()) or "no error output"
