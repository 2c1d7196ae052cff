"""Pipe a streamed text (stdin, line by line) into a live session and watch the avatar say it.

    some-chatbot --stream | python examples/live_client.py --server http://localhost:3000 \\
        --language en --video conversation.mp4

Each line read from stdin is sent as it arrives (``{"type": "text", "text": line, "final": false}``);
the server speaks every sentence as soon as it is complete. End of input sends
``{"type": "flush"}`` (speak what is left), waits until the avatar has said everything, then
closes. Events are printed as JSON lines on stdout; with ``--video`` the session's live video
(fragmented MP4) is saved as it is made (``ffplay`` can play the file while it grows). Ctrl-C
interrupts the avatar; a second Ctrl-C ends the session.

Needs ``requests`` and ``simple-websocket`` (both in the service's requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import requests
from simple_websocket import Client, ConnectionClosed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://localhost:3000")
    ap.add_argument("--language", default="auto", help="ru, kk, en or auto (each sentence's own)")
    ap.add_argument("--avatar-id", help="an avatar of the library (default: the preloaded one)")
    ap.add_argument("--model", help="a lip-sync model by name (GET /api/models)")
    ap.add_argument("--api-key", help="when the server asks for one")
    ap.add_argument("--video", help="save the live video to this .mp4 file")
    args = ap.parse_args()

    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    body = {k: v for k, v in {"language": args.language, "avatar_id": args.avatar_id, "model": args.model}.items() if v}
    r = requests.post(f"{args.server}/api/sessions", json=body, headers=headers, timeout=30)
    if r.status_code != 201:
        print(f"cannot open a session: {r.status_code} {r.text}", file=sys.stderr)
        return 1
    session = r.json()
    if args.video:
        threading.Thread(target=_save_video, args=(f"{args.server}{session['video_url']}", headers, args.video),
                         daemon=True).start()
    ws_base = args.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    query = f"?api_key={args.api_key}" if args.api_key else ""
    ws = Client.connect(f"{ws_base}{session['ws_url']}{query}")
    pending: dict = {}  # "last": when the avatar last stopped speaking (far ahead while it speaks)
    done = threading.Event()
    threading.Thread(target=_print_events, args=(ws, pending, done), daemon=True).start()
    try:
        for line in sys.stdin:
            ws.send(json.dumps({"type": "text", "text": line, "final": False}))
        ws.send(json.dumps({"type": "flush"}))
        # Wait until the avatar has said it all (nothing spoken for 3 s after the last sentence).
        while not done.is_set() and (time.monotonic() - pending.get("last", time.monotonic())) < 3.0:
            time.sleep(0.2)
            pending.setdefault("last", time.monotonic())
    except KeyboardInterrupt:
        ws.send(json.dumps({"type": "interrupt"}))
        try:
            while not done.is_set():
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    finally:
        try:
            ws.send(json.dumps({"type": "close"}))
            ws.close()
        except ConnectionClosed:
            pass
    return 0


def _print_events(ws, pending: dict, done: threading.Event) -> None:
    try:
        while True:
            raw = ws.receive()
            if raw is None:
                break
            print(raw, flush=True)
            event = json.loads(raw)
            if event["type"] in ("speaking_started", "speaking_ended"):
                pending["last"] = time.monotonic() + (3600 if event["type"] == "speaking_started" else 0)
            if event["type"] == "closed":
                break
    except ConnectionClosed:
        pass
    done.set()


def _save_video(url: str, headers: dict, path: str) -> None:
    with requests.get(url, headers=headers, stream=True, timeout=30) as r, open(path, "wb") as out:
        for chunk in r.iter_content(65536):
            out.write(chunk)
            out.flush()


if __name__ == "__main__":
    sys.exit(main())
