"""A live conversation: text arrives in pieces, the avatar speaks it in one endless video.

Three threads per session, each owning one thing:

* **speech** (``_synthesise``): complete sentences, cut from the incoming text as soon as
  they end (``SentenceBuffer``), are synthesised one ahead of the one being spoken;
* **render** (``_render``): one frame every 1/fps s of wall time, at most ``LEAD_S`` ahead:
  the avatar speaking the current sentence when there is one, else idling (blinks,
  breathing, mouth at rest) over silence; each frame goes to the encoder with exactly its
  own share of sound, so picture and sound never drift apart across sentences;
* **stream** (``_publish``): the encoder's fragments to every viewer; a viewer joining
  late gets the init segment and the fragments since the last keyframe.

Events (``listen()``): ``speaking_started`` (when the sentence's first frame is in a
published fragment: viewers can play it; ``latency_ms`` from the sentence's arrival),
``speaking_ended`` (``interrupted`` true after an interrupt), ``error`` (a sentence the
voice could not speak: the session goes on), ``closed`` (with the reason). No HTTP here:
``lipsync.server.sessions_api`` maps a WebSocket and a video URL onto this.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from lipsync.engines.base import Engine, PreparedAvatar
from lipsync.errors import LipsyncError
from lipsync.live.encoder import LiveEncoder
from lipsync.live.fmp4 import Segment, codecs
from lipsync.media import audio, video
from lipsync.motion.idle import apply_idle, idle_track, map_buffers
from lipsync.tts.base import Speech
from lipsync.tts.language import resolve_language
from lipsync.tts.text import complete_length, split_sentences

log = logging.getLogger("lipsync.live")

LEAD_S = 0.08            # frames rendered ahead of the wall clock: the stream's own delay
IDLE_BLOCK = 25          # idle frames planned at once
MAX_PENDING_CHARS = 5000  # text buffered but not yet spoken, per session
VIEWER_QUEUE = 400       # fragments a viewer may lag behind (~30 s) before it is dropped


class SentenceBuffer:
    """Text arriving in chunks, given back sentence by sentence as soon as each is complete
    (its end mark followed by white space), or in pieces of at most ``MAX_PIECE`` characters
    when a sentence runs on without one."""

    MAX_PIECE = 250

    def __init__(self):
        self.text = ""

    def add(self, chunk: str) -> list[str]:
        """Append ``chunk``; the sentences it completed (the unfinished tail stays)."""
        self.text += chunk
        end = complete_length(self.text)
        done, self.text = split_sentences(self.text[:end], self.MAX_PIECE), self.text[end:]
        if len(self.text) > self.MAX_PIECE:  # a run-on: speak all but its last piece
            pieces = split_sentences(self.text, self.MAX_PIECE)
            done += pieces[:-1]
            self.text = pieces[-1]
        return [" ".join(s.split()) for s in done]

    def flush(self) -> list[str]:
        """Everything buffered, complete or not."""
        parts = split_sentences(self.text, self.MAX_PIECE)
        self.text = ""
        return [" ".join(s.split()) for s in parts]


@dataclass
class _Utterance:
    text: str
    received: float                     # time.monotonic() when its last character arrived
    speech: Speech | None = None
    generation: int = 0
    start_frame: int = -1
    frames: int = 0
    ended: dict | None = None           # its speaking_ended, when it ended before it was announced


class LiveSession:
    """One live session (see module doc). ``close()`` ends it; ``on_close(session)`` runs once."""

    def __init__(self, *, tts, engine: Engine, model: str, avatar: PreparedAvatar, language: str,
                 fps: int, preset: str = "veryfast", crf: int = 23, idle_timeout: float = 120.0,
                 on_close: Callable[[LiveSession], None] | None = None, owner: str | None = None):
        self.id = "ls_" + secrets.token_hex(8)
        self.owner = owner
        self.model = model
        self.language = language
        self.fps = int(fps)
        self.idle_timeout = idle_timeout
        self.created = time.time()
        self.last_activity = time.monotonic()
        self.closed = threading.Event()
        self.close_reason: str | None = None
        self._tts, self._engine, self._avatar = tts, engine, avatar
        self._on_close = on_close
        height, width = avatar.image.shape[:2]
        self.size = (width, height)
        self._encoder = LiveEncoder(width, height, self.fps, preset=preset, crf=crf)
        self._buffer = SentenceBuffer()
        self._sentences: queue.Queue[_Utterance | None] = queue.Queue()
        self._ready: queue.Queue[_Utterance] = queue.Queue(maxsize=1)  # one ahead of the one speaking
        self._generation = 0        # bumped by interrupt: older sentences are dropped
        self._lock = threading.Lock()
        self._listeners: list[queue.Queue] = []
        self._viewers: list[queue.Queue] = []
        self._init: Segment | None = None
        self._gop: list[Segment] = []
        self._speaking: _Utterance | None = None
        self._announce: list[_Utterance] = []   # started, waiting for their first fragment
        self.latencies: list[float] = []        # seconds, sentence arrival -> its first frame published
        self.frames = 0
        self._seed = zlib.crc32(self.id.encode())
        self._threads = [threading.Thread(target=fn, name=f"live-{name}-{self.id[-6:]}", daemon=True)
                         for name, fn in (("speech", self._synthesise), ("render", self._render),
                                          ("stream", self._publish))]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ control
    def add_text(self, text: str, final: bool = False) -> None:
        """Text as it arrives; complete sentences are spoken at once, the rest when it completes
        (or at ``final``/``flush``)."""
        self.touch()
        with self._lock:
            if len(self._buffer.text) + len(text) > MAX_PENDING_CHARS:
                raise LipsyncError(f"more than {MAX_PENDING_CHARS} characters are waiting to be spoken",
                                   code="text_too_long", status=413)
            sentences = self._buffer.add(text)
            if final:
                sentences += self._buffer.flush()
            generation = self._generation
        now = time.monotonic()
        for sentence in sentences:
            self._sentences.put(_Utterance(sentence, now, generation=generation))

    def flush(self) -> None:
        """Speak what is buffered, even without a sentence end."""
        self.add_text("", final=True)

    def interrupt(self) -> None:
        """Stop speaking at once (barge-in): the sentence being spoken and every one waiting are dropped."""
        self.touch()
        with self._lock:
            self._generation += 1
            self._buffer = SentenceBuffer()
        _drain(self._ready)

    def touch(self) -> None:
        """The client is still there (any message counts): the idle timeout starts again."""
        self.last_activity = time.monotonic()

    # ------------------------------------------------------------------ outputs
    def listen(self) -> queue.Queue:
        """A queue of this session's events (dicts); ``None`` after ``closed``."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._listeners.append(q)
        if self.closed.is_set():
            q.put(None)
        return q

    def unlisten(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._listeners:
                self._listeners.remove(q)

    def _emit(self, event: dict) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for q in listeners:
            q.put(event)

    def watch(self, timeout: float = 10.0) -> Iterator[bytes]:
        """The live video for one viewer: init segment, the fragments since the last keyframe,
        then each new one, until the session ends (or the viewer falls ``VIEWER_QUEUE`` behind)."""
        q: queue.Queue = queue.Queue(maxsize=VIEWER_QUEUE)
        deadline = time.monotonic() + timeout
        while self._init is None and not self.closed.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            if self._init is None:
                return
            backlog = [self._init, *self._gop]
            self._viewers.append(q)
        try:
            for segment in backlog:
                yield segment.data
            while True:
                segment = q.get()
                if segment is None:
                    return
                yield segment.data
        finally:
            with self._lock:
                if q in self._viewers:
                    self._viewers.remove(q)

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    @property
    def speaking(self) -> bool:
        """Saying something, or about to (sentences waiting)."""
        return self._speaking is not None or not self._ready.empty() or not self._sentences.empty()

    # ------------------------------------------------------------------ threads
    def _synthesise(self) -> None:
        while (utterance := self._sentences.get()) is not None:
            if utterance.generation != self._generation:
                continue
            try:
                language = resolve_language(utterance.text, self.language, allow_mismatch=True)
                speech = self._tts.synthesize(utterance.text, language)
            except LipsyncError as exc:
                self._emit({"type": "error", "code": exc.code, "error": exc.message, "text": utterance.text})
                continue
            except Exception as exc:  # noqa: BLE001 - one sentence failing must not end the session
                log.exception("session %s: TTS failed", self.id)
                self._emit({"type": "error", "code": "tts_failed", "error": str(exc)[:200], "text": utterance.text})
                continue
            utterance.speech = speech
            while not self.closed.is_set():
                if utterance.generation != self._generation:
                    break
                try:
                    self._ready.put(utterance, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _render(self) -> None:
        avatar, rig = self._avatar, self._avatar.idle
        rate = audio.SAMPLE_RATE
        face = rig.face_height if rig is not None else 0.0
        started = time.monotonic()
        idle_motion = None
        idle_from = 0
        current = None   # (utterance, frames iterator, samples, motion)
        moved = np.empty_like(avatar.image) if rig is not None else None
        maps = map_buffers(rig) if rig is not None else None
        try:
            while not self.closed.is_set():
                k = self.frames
                # Pace: frame k is due at k / fps; stay at most LEAD_S ahead of the wall clock.
                ahead = k / self.fps - (time.monotonic() - started)
                if ahead > LEAD_S:
                    time.sleep(ahead - LEAD_S)
                if current is not None and current[0].generation != self._generation:
                    self._end_utterance(current, interrupted=True)
                    current = None
                if current is None:
                    try:
                        utterance = self._ready.get_nowait()
                    except queue.Empty:
                        utterance = None
                    if utterance is not None and utterance.generation == self._generation:
                        current = self._start_utterance(utterance, k, face)
                        idle_motion = None
                n0, n1 = (k * rate) // self.fps, ((k + 1) * rate) // self.fps
                if current is not None:
                    utterance, frames, samples, motion = current
                    i = k - utterance.start_frame
                    frame = next(frames)
                    if motion is not None:
                        frame = apply_idle(frame, rig, motion, i, out=moved, maps=maps)
                    base = utterance.start_frame * rate // self.fps
                    sound = samples[n0 - base:n1 - base]
                    if len(sound) < n1 - n0:
                        sound = np.pad(sound, (0, n1 - n0 - len(sound)))
                    self._encoder.write(frame, sound)
                    if i + 1 >= utterance.frames:
                        self._end_utterance(current, interrupted=False)
                        current = None
                else:
                    if idle_motion is None or k - idle_from >= IDLE_BLOCK:
                        idle_from = k
                        idle_motion = idle_track(IDLE_BLOCK, self.fps, self._seed, face, first=k) \
                            if rig is not None else None
                    frame = avatar.image
                    if idle_motion is not None:
                        frame = apply_idle(frame, rig, idle_motion, k - idle_from, out=moved, maps=maps)
                    self._encoder.write(frame, np.zeros(n1 - n0, np.float32))
                self.frames = k + 1
        except Exception as exc:  # noqa: BLE001 - reported to the client; the session ends
            log.exception("session %s: rendering failed", self.id)
            self._emit({"type": "error", "code": getattr(exc, "code", "internal_error"),
                        "error": getattr(exc, "message", "internal error; the server log has the details")})
            threading.Thread(target=self.close, args=("error",), daemon=True).start()

    def _start_utterance(self, utterance: _Utterance, k: int, face: float):
        speech = utterance.speech
        samples = np.asarray(speech.samples, np.float32)
        n = max(1, math.ceil(len(samples) * self.fps / speech.sample_rate))
        utterance.start_frame, utterance.frames = k, n
        patches = self._engine.render(self._avatar, Speech(samples, speech.sample_rate, speech.phonemes), self.fps)
        motion = None
        if self._avatar.idle is not None:
            motion = idle_track(n, self.fps, self._seed, face,
                                mouth_open=audio.frame_loudness(samples, n, self.fps), first=k)

        def frames():
            for batch in patches:
                yield from video.composite(self._avatar, [batch])
            while True:  # never short of frames (an engine gives frame_count(samples) >= n)
                yield self._avatar.image

        self._speaking = utterance
        with self._lock:
            self._announce.append(utterance)
        return utterance, frames(), samples, motion

    def _end_utterance(self, current, interrupted: bool) -> None:
        utterance, frames, _, _ = current
        frames.close()
        self._speaking = None
        with self._lock:
            if utterance in self._announce:  # ended before its first fragment went out
                self._announce.remove(utterance)
                announced = False
            else:
                announced = True
        event = {"type": "speaking_ended", "text": utterance.text, "interrupted": interrupted,
                 "at": round(self.frames / self.fps, 3)}
        if announced:
            self._emit(event)
        else:
            utterance.ended = event

    def _publish(self) -> None:
        try:
            for segment in self._encoder.segments():
                with self._lock:
                    if segment.init:
                        self._init = segment
                        continue
                    if segment.keyframe:
                        self._gop = []
                    self._gop.append(segment)
                    viewers = list(self._viewers)
                    # A sentence is playable once the fragment holding its first frame is out.
                    due = [u for u in self._announce if u.start_frame / self.fps < segment.end]
                    for u in due:
                        self._announce.remove(u)
                for q in viewers:
                    try:
                        q.put_nowait(segment)
                    except queue.Full:  # this viewer stopped reading: drop it, not the session
                        with self._lock:
                            if q in self._viewers:
                                self._viewers.remove(q)
                        _drain(q)
                        q.put(None)
                now = time.monotonic()
                for u in due:
                    latency = now - u.received
                    self.latencies.append(latency)
                    self._emit({"type": "speaking_started", "text": u.text, "at": round(u.start_frame / self.fps, 3),
                                "latency_ms": round(latency * 1000.0, 1)})
                    if u.ended is not None:
                        self._emit(u.ended)
        finally:
            with self._lock:
                viewers = list(self._viewers)
            for q in viewers:
                _drain(q)
                q.put(None)

    # ------------------------------------------------------------------ end
    def close(self, reason: str = "closed") -> None:
        """End the session (once): threads stop, the stream ends, listeners get ``closed``."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            self.close_reason = reason
        self._sentences.put(None)
        current = threading.current_thread()
        render = self._threads[1]
        if render is not current:
            render.join(timeout=5)
        self._encoder.close()
        for thread in self._threads:
            if thread is not current:
                thread.join(timeout=5)
        self._emit({"type": "closed", "reason": reason})
        with self._lock:
            listeners = list(self._listeners)
        for q in listeners:
            q.put(None)
        if self._on_close is not None:
            self._on_close(self)

    def describe(self) -> dict:
        """What ``GET /api/sessions/<id>`` shows."""
        return {"id": self.id, "status": "closed" if self.closed.is_set() else "open", "model": self.model,
                "language": self.language, "fps": self.fps, "width": self.size[0], "height": self.size[1],
                "seconds": round(self.frames / self.fps, 2), "speaking": self.speaking,
                "viewers": self.viewers, "close_reason": self.close_reason,
                "codecs": _codecs(self._init)}


def _codecs(init: Segment | None) -> str | None:
    return codecs(init.data) if init is not None else None


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
