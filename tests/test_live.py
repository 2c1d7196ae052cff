"""Live conversation sessions (issue 15): text over a real WebSocket, the avatar speaking it in
one endless fragmented-MP4 video, idling in between.

A real threaded HTTP server on loopback (werkzeug, as ``python app.py`` runs), a real RFC 6455
client (simple-websocket), the video read over HTTP as a browser would, and decoded with PyAV:
timestamps, sound, and the mouth in the pixels.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from simple_websocket import Client
from werkzeug.serving import make_server

from lipsync.media.audio import frame_loudness
from lipsync.server import close_app, create_app
from lipsync.server.settings import ServerSettings
from lipsync.settings import Settings
from tests.media import decoded_audio, decoded_frames

pytestmark = pytest.mark.slow  # sessions run in real time

FPS = 25
KEY_A = "live-test-key-number-one-0123"
KEY_B = "live-test-key-number-two-0123"


def _serve(root, **more):
    settings = Settings(engine="builtin", output_dir=str(root / "out"), cache_dir=str(root / "cache"),
                        checkpoint_dir=str(root / "none"), checkpoint_path=str(root / "none.pt"), fps=FPS,
                        **{k: v for k, v in more.items() if k in Settings.__dataclass_fields__})
    server = ServerSettings(rate_limit="off", rate_limit_read="off",
                            **{k: v for k, v in more.items() if k in ServerSettings.__dataclass_fields__})
    app = create_app({"SETTINGS": settings, "SERVER": server, "LOAD_IN_BACKGROUND": False})
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="live-test-http", daemon=True)
    thread.start()
    return SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}", ws=f"ws://127.0.0.1:{httpd.server_port}",
                           app=app, httpd=httpd)


def _stop(server) -> None:
    server.httpd.shutdown()
    close_app(server.app)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = _serve(tmp_path_factory.mktemp("live"))
    yield server
    _stop(server)


class Conversation:
    """A session as a client sees it: its WebSocket, its events, and its video being recorded."""

    def __init__(self, server, headers=None, **body):
        r = requests.post(server.url + "/api/sessions", json=body, headers=headers or {})
        assert r.status_code == 201, r.text
        self.state = r.json()
        self.server = server
        self.video = bytearray()
        self.events: list[dict] = []
        self._watcher = threading.Thread(target=self._watch, args=(headers,), daemon=True)
        self._watcher.start()
        query = f"?api_key={headers['X-API-Key']}" if headers else ""
        self.ws = Client.connect(f"{server.ws}{self.state['ws_url']}{query}")
        assert self.next("ready")["session"]["id"] == self.state["id"]

    def _watch(self, headers) -> None:
        with requests.get(self.server.url + self.state["video_url"], stream=True, headers=headers or {}) as r:
            for chunk in r.iter_content(65536):
                self.video.extend(chunk)

    def send(self, **message) -> None:
        self.ws.send(json.dumps(message))

    def next(self, kind: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.ws.receive(timeout=max(0.05, deadline - time.monotonic()))
            if raw is None:
                continue
            event = json.loads(raw)
            self.events.append(event)
            if event["type"] == kind:
                return event
        raise AssertionError(f"no {kind!r} event within {timeout} s; got {self.events}")

    def end(self, tmp_path):
        """Close the WebSocket; the session ends and its video with it: the recorded MP4's path."""
        self.ws.close()
        self._watcher.join(10)
        assert not self._watcher.is_alive(), "the video did not end with the session"
        path = tmp_path / f"{self.state['id']}.mp4"
        path.write_bytes(bytes(self.video))
        return path


def _aligned_audio(path) -> tuple[np.ndarray, np.ndarray]:
    """The stream's sound (16 kHz) starting at its first video frame's time, and the frames' times."""
    import av

    with av.open(str(path)) as container:
        pts = np.array([float(f.pts * f.time_base) for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        first_audio = next(float(f.pts * f.time_base) for f in container.decode(audio=0))
    pcm = decoded_audio(path)
    shift = round((first_audio - pts[0]) * 16000)  # > 0: the sound starts after the picture
    pcm = np.concatenate([np.zeros(shift, np.float32), pcm]) if shift > 0 else pcm[-shift:]
    return pcm, pts


def _frame(event: dict, pts: np.ndarray) -> int:
    """The index, in the recorded video, of the frame at an event's session time ``at``."""
    return round((event["at"] - pts[0]) * FPS)


def _mouth_change(frames: np.ndarray, still: np.ndarray) -> np.ndarray:
    """Per frame: how far the lower middle of the face is from the avatar at rest (mean |diff|)."""
    h, w = still.shape[:2]
    box = (slice(int(0.25 * h), int(0.55 * h)), slice(int(0.3 * w), int(0.7 * w)))
    return np.array([np.abs(f[box].astype(int) - still[box]).mean() for f in frames])


def test_two_utterances_and_the_idle_gap_in_one_video_in_sync(server, tmp_path):
    talk = Conversation(server, language="en", idle_motion=False)  # a still face: the mouth alone moves
    assert talk.state["ws_url"].endswith("/ws") and talk.state["status"] == "open"
    time.sleep(0.5)  # a moment of idling first
    talk.send(type="text", text="Hello there. ")
    first = talk.next("speaking_started")
    assert first["text"] == "Hello there." and first["latency_ms"] > 0
    first_end = talk.next("speaking_ended")
    assert first_end["interrupted"] is False
    time.sleep(1.5)  # the avatar listens
    talk.send(type="text", text="How are you")  # an unfinished sentence waits ...
    time.sleep(0.6)
    assert not [e for e in talk.events if e["type"] == "speaking_started" and e["text"].startswith("How")]
    talk.send(type="text", text=" today?", final=True)  # ... until it is complete
    second = talk.next("speaking_started")
    assert second["text"] == "How are you today?"
    second_end = talk.next("speaking_ended")
    time.sleep(0.5)
    path = talk.end(tmp_path)

    frames = np.stack(list(decoded_frames(path)))
    pcm, pts = _aligned_audio(path)
    # One continuous stream: every frame 1/25 s after the last, sound as long as the picture (the
    # recording starts and ends on a fragment: up to one AAC frame, 23 ms, more sound either side).
    assert np.allclose(np.diff(pts), 1 / FPS, atol=1e-3), "frames are missing or doubled"
    assert abs(len(pcm) / 16000 - len(frames) / FPS) <= 1 / FPS + 0.024
    # Sound and picture in step across utterances: each sentence is heard from the frame it
    # starts on (espeak's own lead-in silence is a frame or so), the second as the first.
    loud = frame_loudness(pcm, len(frames), FPS) > 0.05
    for started, ended in ((first, first_end), (second, second_end)):
        k0, k1 = _frame(started, pts), _frame(ended, pts)
        onset = k0 + int(np.argmax(loud[k0:k1]))
        assert 0 <= onset - k0 <= 2, (started, onset)
        assert not loud[max(0, k0 - 3):k0].any()
    gap = slice(_frame(first_end, pts) + 3, _frame(second, pts) - 3)
    assert gap.stop - gap.start > 30 and not loud[gap].any()  # silence while listening
    # The mouth moves while speaking and rests while listening.
    change = _mouth_change(frames, np.median(frames[gap], axis=0))  # against the face at rest
    speaking = np.concatenate([change[_frame(e, pts):_frame(f, pts)]
                               for e, f in ((first, first_end), (second, second_end))])
    assert np.median(change[gap]) < 1.0 and np.percentile(speaking, 80) > 3.0, (np.median(change[gap]),
                                                                              np.percentile(speaking, 80))


def test_the_avatar_idles_while_listening(server, tmp_path):
    talk = Conversation(server, language="en")  # idle motion on: the server's default
    time.sleep(4.0)
    frames = np.stack(list(decoded_frames(talk.end(tmp_path))))
    assert len(frames) > 3 * FPS
    # Never frozen, never jumping: every second differs from the one before, by a little.
    steps = [np.abs(frames[i].astype(int) - frames[i - FPS]).mean() for i in range(FPS, len(frames), FPS)]
    assert min(steps) > 0.05 and max(np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))) < 3


def test_interrupt_stops_the_speech_at_once(server, tmp_path):
    talk = Conversation(server, language="en")
    talk.send(type="text", text="This is a rather long sentence that goes on and on, so that there is time "
                                "to interrupt it well before its end. ")
    started = talk.next("speaking_started")
    time.sleep(0.8)
    talk.send(type="interrupt")
    ended = talk.next("speaking_ended", timeout=5)
    assert ended["interrupted"] is True
    spoken = ended["at"] - started["at"]
    assert 0.5 < spoken < 2.5  # cut: the whole sentence lasts over 5 s
    talk.send(type="text", text="Yes? ")  # the conversation goes on
    again = talk.next("speaking_started")
    talk.next("speaking_ended")
    path = talk.end(tmp_path)
    pcm, pts = _aligned_audio(path)
    n = len(pts)
    loud = frame_loudness(pcm, n, FPS) > 0.05
    cut = _frame(ended, pts)
    assert loud[cut - 8:cut].any() and not loud[cut + 1:_frame(again, pts)].any()


def test_bad_messages_get_error_events_and_the_session_goes_on(server, tmp_path):
    talk = Conversation(server, language="ru")
    for bad in ("not json", "[1, 2]", json.dumps({"type": "shout"}), json.dumps({"type": "text", "text": 5})):
        talk.ws.send(bad)
        error = talk.next("error")
        assert error["code"] == "invalid_message" and error["error"]
    talk.send(type="text", text="x" * 6000)
    assert talk.next("error")["code"] == "text_too_long"
    talk.send(type="text", text="Привет! ")
    assert talk.next("speaking_started")["text"] == "Привет!"
    talk.end(tmp_path)


def test_creating_sessions_checks_its_inputs_and_the_capacity(tmp_path):
    server = _serve(tmp_path, max_sessions=1, session_idle_seconds=1.5)
    try:
        for body, code in (({"model": "nope"}, "unknown_model"), ({"avatar_id": "av_0000000000000000"},
                                                                    "unknown_avatar"),
                           ({"language": "de"}, "unsupported_language"), ({"language": 5}, "invalid_input")):
            r = requests.post(server.url + "/api/sessions", json=body)
            assert r.status_code == 400 and r.json()["code"] == code, r.text
        first = requests.post(server.url + "/api/sessions", json={}).json()
        busy = requests.post(server.url + "/api/sessions", json={})
        assert busy.status_code == 429 and busy.json()["code"] == "too_many_sessions"
        # Nobody connects and nothing is said: the idle timeout ends it, and frees its place.
        deadline = time.monotonic() + 10
        while requests.get(server.url + first["url"]).status_code == 200:
            assert time.monotonic() < deadline, "the idle session was not closed"
            time.sleep(0.2)
        assert requests.post(server.url + "/api/sessions", json={}).status_code == 201
        r = requests.get(server.url + "/api/sessions/ls_0000000000000000/video")
        assert r.status_code == 404 and r.json()["code"] == "unknown_session"
        with pytest.raises(Exception):  # noqa: B017 - the handshake is refused with an HTTP 404
            Client.connect(server.ws + "/api/sessions/ls_0000000000000000/ws")
    finally:
        _stop(server)


def test_sessions_belong_to_their_api_key_and_end_at_shutdown(tmp_path):
    server = _serve(tmp_path, api_keys=(KEY_A, KEY_B))
    try:
        talk = Conversation(server, headers={"X-API-Key": KEY_A}, language="kk")
        url = server.url + talk.state["url"]
        assert requests.get(url, headers={"X-API-Key": KEY_A}).status_code == 200
        assert requests.get(url, headers={"X-API-Key": KEY_B}).status_code == 404  # not another key's
        assert requests.get(url).status_code == 401
        server.app.extensions["lifecycle"].begin("test", grace=1.0)
        closed = talk.next("closed", timeout=10)
        assert closed["reason"] == "shutdown"
        assert requests.post(server.url + "/api/sessions", json={}, headers={"X-API-Key": KEY_A}).status_code == 503
    finally:
        _stop(server)


def test_the_example_client_pipes_stdin_into_a_session(server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "example.mp4"
    lines = "Hello from the example client. It reads\nits input line by line. Done.\n"
    run = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "live_client.py"),
                          "--server", server.url, "--language", "en", "--video", str(out)],
                         input=lines, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    spoken = [e["text"] for e in events if e["type"] == "speaking_started"]
    assert spoken == ["Hello from the example client.", "It reads its input line by line.", "Done."], events
    frames = list(decoded_frames(out))
    assert len(frames) > 3 * FPS  # the saved live video plays
