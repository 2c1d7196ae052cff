"""Shared test helpers: the real fixtures in ../shared/fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LIPSYNC_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_path(name: str) -> Path:
    """Path of a file in ../shared/fixtures, or skip the test saying why."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {name} not found in {FIXTURES} (set LIPSYNC_FIXTURES to the shared fixtures folder)")
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
