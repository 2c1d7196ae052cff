"""The open live sessions of this process: opening (within the render capacity), finding
(per API key), idle timeouts and closing them all at shutdown. No HTTP here."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from lipsync.errors import InvalidInputError, LipsyncError, RefusedError
from lipsync.live.session import LiveSession
from lipsync.tts.base import LANGUAGE_CHOICES

log = logging.getLogger("lipsync.live")

CHECK_EVERY_S = 1.0


class SessionManager:
    """``open()`` a session for a request, ``get()`` it by id for its owner, ``close_all()``.

    ``service``: the loaded ``LipsyncService``; ``capacity()``: a context manager holding one
    render slot for a session's whole life (503 ``busy`` when none is free: sessions share the
    render capacity of synchronous requests); ``max_sessions``: open at once in this process;
    ``idle_timeout``: seconds without a message from the client, while nothing is being
    said, before a session ends (a session nobody connects to ends so too); ``max_seconds``:
    the longest session.
    """

    def __init__(self, service, capacity: Callable[[], contextlib.AbstractContextManager], *,
                 max_sessions: int = 2, idle_timeout: float = 120.0, max_seconds: float = 3600.0):
        self.service = service
        self.capacity = capacity
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.max_seconds = max_seconds
        self._sessions: dict[str, LiveSession] = {}
        self._slots: dict[str, contextlib.ExitStack] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None  # started with the first session

    def open(self, *, avatar_id: str | None = None, language: str | None = None, model: str | None = None,
             owner: str | None = None, idle_motion: bool | None = None) -> LiveSession:
        """A new session speaking ``language`` (a voice, or ``auto``: each sentence's own) with the
        avatar ``avatar_id`` (a photo of the library; default: the preloaded one) and ``model``.
        Raises 400 (``unsupported_language``, ``unknown_avatar``, ``unknown_model``,
        ``unsupported_avatar``), 429 ``too_many_sessions`` (``max_sessions`` open), 503 ``busy`` (no
        render slot free)."""
        service = self.service
        if service.status != "ready":
            raise LipsyncError(f"the service is not ready ({service.status})", code="not_ready", status=503)
        language = language or "auto"
        if language not in LANGUAGE_CHOICES:
            raise InvalidInputError(f"'language' must be one of {', '.join(LANGUAGE_CHOICES)}",
                                    code="unsupported_language")
        record = service.avatars.get(avatar_id or "default", owner)
        if record.kind != "image":
            raise InvalidInputError("live sessions take a photo avatar; a video avatar works with /api/generate "
                                    "and /api/jobs", code="unsupported_avatar")
        model = service.models.resolve(model, record.model)
        avatar = service.avatars.prepared(record.id, owner, model)
        if not (service.settings.idle_motion if idle_motion is None else idle_motion):
            avatar = replace(avatar, idle=None)  # a still face between sentences, only the mouth moves
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise RefusedError(f"{self.max_sessions} live sessions are already open (MAX_SESSIONS); try again "
                                   "later", code="too_many_sessions", status=429, retry_after=10)
            slot = contextlib.ExitStack()
            slot.enter_context(self.capacity())
            try:
                s = service.settings
                session = LiveSession(tts=service.tts, engine=service.models.engine(model), model=model,
                                      avatar=avatar, language=language, fps=s.fps, preset=s.x264_preset,
                                      crf=s.x264_crf, on_close=self._closed, owner=owner)
            except BaseException:
                slot.close()
                raise
            self._sessions[session.id] = session
            self._slots[session.id] = slot
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="live-sessions-reaper", daemon=True)
                self._reaper.start()
        log.info("live session %s opened (model %s, language %s)", session.id, model, language)
        return session

    def get(self, session_id: str, owner: str | None) -> LiveSession:
        """The open session ``session_id`` of ``owner``; 404 ``unknown_session`` otherwise."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise LipsyncError(f"no open session with id {session_id!r}", code="unknown_session", status=404)
        return session

    def _closed(self, session: LiveSession) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
            slot = self._slots.pop(session.id, None)
        if slot is not None:
            slot.close()
        log.info("live session %s closed (%s) after %.1f s of video", session.id, session.close_reason,
                 session.frames / session.fps)

    def _reap(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            now = time.monotonic()
            with self._lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                if session.frames / session.fps > self.max_seconds:
                    session.close("max_duration")
                elif now - session.last_activity > self.idle_timeout and not session.speaking:
                    session.close("idle_timeout")

    @property
    def open_count(self) -> int:
        return len(self._sessions)

    def close_all(self, reason: str = "shutdown") -> None:
        """Close every session (the server is stopping)."""
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close(reason)
