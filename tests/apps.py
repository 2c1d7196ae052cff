"""Building the Flask app in tests: one set of keyword values for both settings objects."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields

from lipsync.server import close_app, create_app
from lipsync.server.settings import ServerSettings
from lipsync.settings import Settings

_SERVER_FIELDS = {f.name for f in fields(ServerSettings)}


def split_settings(**values) -> tuple[Settings, ServerSettings]:
    """``Settings`` and ``ServerSettings`` from keyword values, each field to the object that has it."""
    server = {k: v for k, v in values.items() if k in _SERVER_FIELDS}
    pipeline = {k: v for k, v in values.items() if k not in _SERVER_FIELDS}
    return Settings(**pipeline), ServerSettings(**server)


def make_app(config: dict | None = None, **values):
    """``create_app`` with the settings from ``values`` (models loaded before it returns unless
    ``config`` says otherwise); stop it with ``lipsync.server.close_app``."""
    settings, server = split_settings(**values)
    return create_app({"SETTINGS": settings, "SERVER": server, "LOAD_IN_BACKGROUND": False, **(config or {})})


def no_model_settings(root, **more) -> dict:
    """Settings values for an app whose files are all under ``root``, with no rate limits, the
    built-in engine and the Haar detector, and no user model files (checkpoints, S3FD) found,
    whatever this machine has installed; ``more`` overrides or adds values."""
    return {"output_dir": str(root / "out"), "cache_dir": str(root / "cache"), "engine": "builtin",
            "face_detector": "haar", "rate_limit": "off", "rate_limit_read": "off",
            "checkpoint_dir": str(root / "none"), "checkpoint_path": str(root / "none" / "x.pt"),
            "s3fd_path": str(root / "none" / "s3fd.pth"), **more}


@contextmanager
def unlimited_app(root, **values) -> Iterator:
    """A built-in-engine app with its files under ``root`` and no rate limits (tests send many
    requests), closed on exit; ``values`` override settings."""
    app = make_app(**{"output_dir": str(root / "o"), "cache_dir": str(root / "c"), "engine": "builtin",
                      "rate_limit": "off", "rate_limit_read": "off", **values})
    try:
        yield app
    finally:
        close_app(app)
