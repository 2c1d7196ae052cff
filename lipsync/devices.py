"""Which torch device a model runs on: the one rule the engines and the face detector share."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from lipsync.errors import LipsyncError

if TYPE_CHECKING:
    import torch

NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present wherever the NVIDIA kernel driver is loaded


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"`` and ``"cuda[:n]"`` as given.

    Raises ``LipsyncError`` (``device_unavailable``) for CUDA on a machine without it and
    (``invalid_settings``) for anything else. Imports torch.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LipsyncError("device 'cuda' was requested but no CUDA GPU is available (use 'auto' or 'cpu')",
                               code="device_unavailable")
        return torch.device(device)
    raise LipsyncError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'", code="invalid_settings")


def cuda_device(device: str) -> torch.device | None:
    """The torch CUDA device ``device`` (a ``DEVICE`` setting) resolves to; None for a CPU, or
    where torch is not installed. Imports torch only where an NVIDIA driver is loaded."""
    if device == "cpu":
        return None
    if "torch" not in sys.modules and not os.path.exists(NVIDIA_DRIVER):
        return None  # no NVIDIA driver: no CUDA, and no reason to import torch (~200 MB) to learn it
    try:
        resolved = resolve_device(device)
    except (ImportError, LipsyncError):
        return None
    return resolved if resolved.type == "cuda" else None
