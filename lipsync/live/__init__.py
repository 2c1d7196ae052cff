"""Live conversation sessions: text streamed in, the avatar speaking it in one endless video
(``LiveSession``); no HTTP here (``lipsync.server.sessions_api`` serves it)."""
