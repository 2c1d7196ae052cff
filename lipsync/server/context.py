"""The current app's shared resources, for the blueprints and hooks (inside a request)."""

from __future__ import annotations

from flask import current_app

from lipsync.jobs import JobQueue
from lipsync.server.lifecycle import Lifecycle
from lipsync.server.observability import Metrics
from lipsync.server.settings import ServerSettings
from lipsync.service import LipsyncService
from lipsync.settings import Settings


def service() -> LipsyncService:
    return current_app.extensions["lipsync"]


def jobs() -> JobQueue:
    return current_app.extensions["jobs"]


def lifecycle() -> Lifecycle:
    return current_app.extensions["lifecycle"]


def metrics() -> Metrics:
    return current_app.extensions["metrics"]


def settings() -> Settings:
    return current_app.config["SETTINGS"]


def server_settings() -> ServerSettings:
    return current_app.config["SERVER"]
