"""The built-in lip-sync engine (no weights): a mouth drive from phonemes or the sound
(``drive``), the mouth located and warped in the avatar (``mouth``), the engine (``engine``)."""
