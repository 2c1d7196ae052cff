"""Live sessions over HTTP (``lipsync.live``): a WebSocket for the conversation, a URL for its video.

    POST   /api/sessions                  {avatar_id?, language?, model?, idle_motion?}
                                          -> 201 {id, ws_url, video_url, ...}
    GET    /api/sessions/<id>             the session's state
    DELETE /api/sessions/<id>             end it (204)
    GET    /api/sessions/<id>/video       the live video: fragmented MP4, one endless chunked response
    WS     /api/sessions/<id>/ws          the conversation (protocol below)

Client -> server, one JSON object per text message: ``{"type": "text", "text": "...",
"final": false}`` (text as it arrives; complete sentences are spoken at once),
``{"type": "flush"}`` (speak what is buffered), ``{"type": "interrupt"}`` (stop speaking now),
``{"type": "ping"}`` (keeps a quiet session open), ``{"type": "close"}``. Server -> client:
``ready`` (once, with the session's state), ``speaking_started`` / ``speaking_ended`` (with
the text, the video time ``at``, ``latency_ms`` / ``interrupted``), ``error`` (``code``,
``error``: a bad message or a sentence that could not be spoken; the session goes on),
``closed`` (``reason``). The session ends when its WebSocket closes, after
``SESSION_IDLE_SECONDS`` without a message while nothing is said, on DELETE, and at shutdown.

WebSocket: RFC 6455 via flask-sock (simple-websocket), pinged every ``PING_S`` so proxies and
the server's idle-connection timeout keep it. Why not WebRTC: it needs STUN/TURN and an RTP
stack for what a WebSocket plus Media Source Extensions do in every browser over plain HTTP(S).
"""

from __future__ import annotations

import json
import queue
import threading

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from flask_sock import Sock

from lipsync.errors import InvalidInputError, LipsyncError
from lipsync.inputs import check_service_loaded
from lipsync.server import context
from lipsync.server.avatars_api import request_owner

sessions_api = Blueprint("sessions", __name__, url_prefix="/api/sessions")
sock = Sock()
PING_S = 10.0
MAX_MESSAGE_BYTES = 64 * 1024


def _manager():
    return current_app.extensions["sessions"]


def _entry(session) -> dict:
    base = f"/api/sessions/{session.id}"
    return {**session.describe(), "url": base, "ws_url": f"{base}/ws", "video_url": f"{base}/video"}


@sessions_api.post("")
def create():
    service = context.service()
    check_service_loaded(service)
    if context.settings().queue_url:
        raise LipsyncError("live sessions are rendered by the web process that opens them; in cluster mode "
                           "(QUEUE_URL) open them on a single node without the load balancer",
                           code="sessions_unavailable", status=503)
    body = request.get_json(force=True, silent=True) if request.content_length else {}
    if not isinstance(body, dict):
        raise InvalidInputError("the JSON body must be an object", code="invalid_json")
    for name in ("avatar_id", "language", "model"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidInputError(f"'{name}' must be a string", code="invalid_input")
    idle_motion = body.get("idle_motion")
    if idle_motion is not None and not isinstance(idle_motion, bool):
        raise InvalidInputError("'idle_motion' must be true or false", code="invalid_input")
    try:
        session = _manager().open(avatar_id=body.get("avatar_id") or None, language=body.get("language"),
                                  model=body.get("model") or None, owner=request_owner(), idle_motion=idle_motion)
    except LipsyncError as exc:
        if exc.code == "unknown_avatar":  # a request's field, not the URL: 400 as on /api/generate
            raise InvalidInputError(exc.message, code="unknown_avatar") from None
        raise
    entry = _entry(session)
    return jsonify(entry), 201, {"Location": entry["url"]}


@sessions_api.get("/<session_id>")
def show(session_id: str):
    return jsonify(_entry(_manager().get(session_id, request_owner())))


@sessions_api.delete("/<session_id>")
def delete(session_id: str):
    _manager().get(session_id, request_owner()).close("deleted")
    return "", 204


@sessions_api.get("/<session_id>/video")
def video(session_id: str):
    """The session's video from its last keyframe on, for as long as it lasts."""
    session = _manager().get(session_id, request_owner())
    return Response(stream_with_context(session.watch()), mimetype="video/mp4",
                    headers={"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"})


@sessions_api.before_request
def _known_session() -> None:
    # Checked before flask-sock answers the WebSocket handshake: an unknown id is an HTTP 404.
    if request.endpoint == "sessions.conversation":
        _manager().get(request.view_args["session_id"], request_owner())


@sock.route("/<session_id>/ws", bp=sessions_api)
def conversation(ws, session_id: str):
    session = _manager().get(session_id, request_owner())
    events = session.listen()
    sender = threading.Thread(target=_send_events, args=(ws, events), name=f"ws-out-{session_id[-6:]}", daemon=True)
    sender.start()
    events.put({"type": "ready", "session": _entry(session)})
    try:
        while not session.closed.is_set():
            message = ws.receive(timeout=1.0)
            if message is None:
                continue
            error = _handle(session, message)
            if error is not None:
                events.put({"type": "error", **error})
            if error is None and _is_close(message):
                break
    except Exception:  # noqa: BLE001 - the client went away (ConnectionClosed) or broke the protocol
        pass
    finally:
        session.close("client_closed" if not session.closed.is_set() else session.close_reason)
        session.unlisten(events)
        events.put(None)
        sender.join(timeout=2)


def _is_close(message) -> bool:
    try:
        return json.loads(message).get("type") == "close"
    except (ValueError, AttributeError, TypeError):
        return False


def _handle(session, message) -> dict | None:
    """Apply one client message; an error event's fields when it is not one we take."""
    if isinstance(message, bytes) or len(message) > MAX_MESSAGE_BYTES:
        return {"code": "invalid_message", "error": f"send JSON text messages of at most {MAX_MESSAGE_BYTES} bytes"}
    try:
        data = json.loads(message)
    except ValueError:
        return {"code": "invalid_message", "error": "a message must be a JSON object"}
    if not isinstance(data, dict):
        return {"code": "invalid_message", "error": "a message must be a JSON object"}
    kind = data.get("type")
    try:
        if kind == "text":
            text, final = data.get("text", ""), data.get("final", False)
            if not isinstance(text, str) or not isinstance(final, bool):
                return {"code": "invalid_message", "error": "'text' must be a string and 'final' true or false"}
            session.add_text(text, final=final)
        elif kind == "flush":
            session.flush()
        elif kind == "interrupt":
            session.interrupt()
        elif kind in ("ping", "close"):
            session.touch()
        else:
            return {"code": "invalid_message", "error": "'type' must be text, flush, interrupt, ping or close"}
    except LipsyncError as exc:
        return {"code": exc.code, "error": exc.message}
    return None


def _send_events(ws, events: queue.Queue) -> None:
    while (event := events.get()) is not None:
        try:
            ws.send(json.dumps(event, ensure_ascii=False))
        except Exception:  # noqa: BLE001 - the socket is gone: the receiving side ends the session
            return
