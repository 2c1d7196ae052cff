"""Talking-avatar lip-sync: text or speech in, an MP4 of the avatar speaking out.

The library works without Flask: ``python -m lipsync generate --help``.
"""

__version__ = "0.1.0"
