"""Shared test helpers: the real fixtures in ../shared/fixtures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))


def in_ci() -> bool:
    """True on CI (``CI=true``, as GitHub Actions, GitLab and most others set it)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def skip_or_fail(reason: str, *, allow_module_level: bool = False):
    """Skip the test saying why, except on CI (``CI=true``), where what is missing must be there:
    the test fails with the same reason instead, so no skip can hide a failure.

    ``allow_module_level=True``: called while a test module is imported, it skips the whole module
    (as ``pytest.skip(..., allow_module_level=True)``); on CI the module's collection fails."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing requirement fails instead of skipping]", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, message: str | None = None):
    """Poll ``predicate()`` until it returns something truthy and return that; fail (AssertionError)
    with a clear message (``message`` or the predicate's source) if it has not within ``timeout`` s.
    The timeout is a deadline for a condition, never a measurement: make it generous."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    what = message
    if what is None:
        try:
            import inspect

            what = inspect.getsource(predicate).strip()
        except (OSError, TypeError):
            what = repr(predicate)
    raise AssertionError(f"condition not met within {timeout} s: {what}")


def fixture_path(name: str) -> Path:
    """Path of a file in ../shared/fixtures, or skip the test saying why (fail on CI)."""
    path = FIXTURES / name
    if not path.exists():
        skip_or_fail(f"fixture {name} not found in {FIXTURES} (set LIPSYNC_FIXTURES to the shared fixtures folder)")
    return path


@pytest.fixture
def speech_wav_path() -> Path:
    """7 s of real speech at 16 kHz mono: 1.5 s of silence, then speech."""
    return fixture_path("kennedy_speech_16k.wav")


@pytest.fixture
def avatar_path() -> Path:
    """1290x1483 studio portrait, face about x 420-885, y 137-602."""
    return fixture_path("avatar.jpg")


@pytest.fixture(scope="module")
def torch_threads():
    """Torch on up to 8 of this machine's cores for a module's tests (``pytestmark =
    pytest.mark.usefixtures("torch_threads")``); the previous setting is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    yield
    torch.set_num_threads(before)
