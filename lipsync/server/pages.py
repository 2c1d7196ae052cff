"""The page: ``GET /`` (templates/index.html; its script and styles are in static/)."""

from __future__ import annotations

from flask import Blueprint, render_template

from lipsync.server import context
from lipsync.tts.base import LANGUAGES

pages = Blueprint("pages", __name__)


@pages.get("/")
def index():
    settings = context.settings()
    return render_template("index.html", languages=LANGUAGES, max_text_chars=settings.max_text_chars,
                           max_upload_mb=settings.max_upload_bytes // (1024 * 1024))
