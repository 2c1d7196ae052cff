"""Which torch device a model runs on: the one rule the engines and the face detector share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lipsync.errors import LipsyncError

if TYPE_CHECKING:
    import torch


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
