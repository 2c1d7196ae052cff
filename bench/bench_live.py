"""Live sessions: how soon a sentence is seen, and whether a long session keeps real time.

    .venv/bin/python bench/bench_live.py [--minutes 5] [--engine builtin] [--checkpoint PATH] [--device cpu]

A real server (werkzeug, threaded, loopback), a WebSocket client and a viewer reading the
video over HTTP. Chatbot replies of 2-4 sentences arrive at ``--cps`` characters per second
(default 20), each after the avatar finished the previous one plus a 2 s pause.

Printed:
* latency of each reply's first sentence, from its last character arriving to the fragment
  holding its first frame: as the server publishes it (``latency_ms`` of ``speaking_started``)
  and as the viewer receives it over HTTP (the client-side figure is what a browser can play);
* the stream's pace: frames made vs wall-clock time (a session that cannot keep real time
  falls behind here), checked every 10 s, and the largest delay of a frame behind its due time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lipsync.live.fmp4 import FragmentReader  # noqa: E402
from lipsync.settings import Settings  # noqa: E402

REPLIES = [
    "Hello! I am the assistant of this kiosk. How can I help you today?",
    "The museum opens at nine and closes at six. Tickets are sold at the entrance.",
    "Yes, there is a cafe on the second floor. It serves coffee, tea and light meals.",
    "The modern art collection is in the east wing. Take the stairs on your left.",
    "Guided tours start every hour. They last about forty minutes and are free with your ticket.",
    "You are welcome! Enjoy your visit, and come back soon.",
]


class _Viewer:
    """Reads the session's video over HTTP, noting when each fragment arrived."""

    def __init__(self, url: str):
        import requests

        self.arrivals: list[tuple[float, float, float]] = []  # (monotonic, start, end) of each fragment
        self._response = requests.get(url, stream=True, timeout=30)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        raw = self._response.raw
        for segment in FragmentReader(raw):
            if not segment.init:
                self.arrivals.append((time.monotonic(), segment.start, segment.end))

    def received(self, at: float) -> float | None:
        """When the fragment holding video time ``at`` arrived (None: not yet)."""
        for when, start, end in self.arrivals:
            if start <= at + 1e-6 < end:
                return when
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--cps", type=float, default=20.0, help="characters per second the replies arrive at")
    ap.add_argument("--engine", default="builtin")
    ap.add_argument("--checkpoint", help="a Wav2Lip checkpoint (with --engine wav2lip)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--avatar", help="avatar image (default: the built-in portrait)")
    ap.add_argument("--face-box", help="x1,y1,x2,y2 on the avatar (no detector needed)")
    ap.add_argument("--direct", action="store_true",
                    help="no HTTP: the session in this process, latency as published (for a GPU machine "
                         "without the web stack installed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"checkpoint_path": args.checkpoint} if args.checkpoint else {"checkpoint_path": f"{tmp}/none.pt"}
        settings = Settings(engine=args.engine, device=args.device, output_dir=f"{tmp}/out", cache_dir=f"{tmp}/c",
                            checkpoint_dir=f"{tmp}/none", session_idle_seconds=600, avatar_path=args.avatar,
                            face_detector="haar", **extra,
                            face_box=tuple(int(v) for v in args.face_box.split(",")) if args.face_box else None)
        if args.direct:
            return _run_direct(settings, args)
        from werkzeug.serving import make_server

        from lipsync.server import close_app, create_app
        from lipsync.server.settings import ServerSettings

        app = create_app({"SETTINGS": settings, "SERVER": ServerSettings(rate_limit="off", rate_limit_read="off"),
                          "LOAD_IN_BACKGROUND": False})
        httpd = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_port}"
        try:
            return _run(base, f"ws://127.0.0.1:{httpd.server_port}", app, args)
        finally:
            httpd.shutdown()
            close_app(app)


def _run_direct(settings: Settings, args) -> int:
    from lipsync.live.session import LiveSession
    from lipsync.service import LipsyncService

    service = LipsyncService(settings).load()
    if service.status != "ready":
        print(f"the service did not load: {service.error}")
        return 1
    model = service.models.default
    session = LiveSession(tts=service.tts, engine=service.models.engine(model), model=model,
                          avatar=service.avatars.prepared("default", None, model), language="en", fps=settings.fps)
    viewer_chunks = threading.Thread(target=lambda: [None for _ in session.watch()], daemon=True)
    viewer_chunks.start()
    events = session.listen()
    print(f"live session (no HTTP): model {model} on {service.engine.describe()['device']}, "
          f"{session.size[0]}x{session.size[1]} at {session.fps} fps; replies at {args.cps:g} characters/s "
          f"for {args.minutes:g} min")
    started = time.monotonic()
    latencies, pace = [], []
    reply = 0
    time.sleep(1.0)
    while time.monotonic() - started < args.minutes * 60:
        text = REPLIES[reply % len(REPLIES)] + " "
        reply += 1
        for i in range(0, len(text), 5):
            session.add_text(text[i:i + 5])
            time.sleep(5 / args.cps)
        first = None
        while True:
            event = events.get(timeout=60)
            if event["type"] == "speaking_started" and first is None:
                first = event
            if event["type"] == "speaking_ended" and not session.speaking:
                break
        latencies.append(first["latency_ms"])
        pace.append((time.monotonic() - started, session.frames / session.fps))
        time.sleep(2.0)
    session.close("done")
    print(f"first sentence -> its first frame published: median {statistics.median(latencies):.0f} ms, "
          f"max {max(latencies):.0f} ms ({len(latencies)} replies): " + ", ".join(f"{x:.0f}" for x in latencies))
    behind = [wall - made for wall, made in pace]
    print(f"pace: video behind wall clock {behind[0]:.2f} s at first, {behind[-1]:.2f} s at the end "
          f"(growth {behind[-1] - behind[0]:+.2f} s over {pace[-1][0] - pace[0][0]:.0f} s)")
    return 0


def _run(base: str, ws_base: str, app, args) -> int:
    import requests
    from simple_websocket import Client, ConnectionClosed

    state = requests.post(base + "/api/sessions", json={"language": "en"}, timeout=30).json()
    viewer = _Viewer(base + state["video_url"])
    ws = Client.connect(ws_base + state["ws_url"])
    session = app.extensions["sessions"].get(state["id"], None)
    events: list[tuple[float, dict]] = []
    lock = threading.Lock()

    def listen() -> None:
        while True:
            try:
                raw = ws.receive()
            except ConnectionClosed:
                return
            if raw is None:
                return
            with lock:
                events.append((time.monotonic(), json.loads(raw)))

    threading.Thread(target=listen, daemon=True).start()
    started = time.monotonic()
    pace: list[tuple[float, float]] = []  # (elapsed wall s, video s made)
    firsts: list[tuple[float, float]] = []   # (server ms, client ms) per reply's first sentence
    next_check = 10.0
    reply = 0
    time.sleep(1.0)
    print(f"live session {state['id']}: engine {state['model']}, {state['width']}x{state['height']} at "
          f"{state['fps']} fps; replies at {args.cps:g} characters/s for {args.minutes:g} min")
    while time.monotonic() - started < args.minutes * 60:
        text = REPLIES[reply % len(REPLIES)] + " "
        reply += 1
        mark = len(events)
        first_sentence_end = None
        for i in range(0, len(text), 5):  # chunks of 5 characters, as a chatbot streams tokens
            ws.send(json.dumps({"type": "text", "text": text[i:i + 5]}))
            if first_sentence_end is None and any(c in text[i:i + 5] for c in ".!?"):
                first_sentence_end = time.monotonic()
            time.sleep(5 / args.cps)
            elapsed = time.monotonic() - started
            if elapsed >= next_check:
                pace.append((elapsed, session.frames / session.fps))
                next_check += 10.0
        # The first sentence of this reply: seen by the viewer when its fragment arrived.
        while True:
            with lock:
                got = [e for _, e in events[mark:] if e["type"] == "speaking_started"]
                done = [e for _, e in events[mark:] if e["type"] == "speaking_ended"]
            if got and len(done) >= len(got) and not session.speaking:
                break
            time.sleep(0.05)
            elapsed = time.monotonic() - started
            if elapsed >= next_check:
                pace.append((elapsed, session.frames / session.fps))
                next_check += 10.0
        first = got[0]
        arrived = viewer.received(first["at"])
        client_ms = (arrived - first_sentence_end) * 1000.0 if arrived and first_sentence_end else float("nan")
        firsts.append((first["latency_ms"], client_ms))
        time.sleep(2.0)
    ws.close()
    print(f"\n{'reply':>5} {'server ms':>10} {'viewer ms':>10}")
    for i, (server_ms, client_ms) in enumerate(firsts, 1):
        print(f"{i:>5} {server_ms:>10.0f} {client_ms:>10.0f}")
    server_all = [s for s, _ in firsts]
    client_all = [c for _, c in firsts if c == c]
    print(f"\nfirst sentence -> first frame: server median {statistics.median(server_all):.0f} ms "
          f"(max {max(server_all):.0f}), viewer median {statistics.median(client_all):.0f} ms "
          f"(max {max(client_all):.0f}); {len(firsts)} replies")
    print(f"{'wall s':>8} {'video s':>8} {'behind s':>9}")
    for wall, made in pace:
        print(f"{wall:>8.1f} {made:>8.2f} {wall - made:>9.2f}")
    behind = [wall - made for wall, made in pace]
    if behind:
        print(f"pace: video behind wall clock {behind[0]:.2f} s at first, {behind[-1]:.2f} s at the end "
              f"(growth {behind[-1] - behind[0]:+.2f} s over {pace[-1][0] - pace[0][0]:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
