"""Fragmented MP4 as ffmpeg writes it to a pipe, cut into what a live viewer needs.

A live stream is an *init segment* (``ftyp`` + ``moov``: the codecs, no samples) followed by
*fragments* (``moof`` + ``mdat``: a few frames of video and their sound). A viewer joining
late gets the init segment, then the fragments from the last one that starts with a video
keyframe (a decoder can start nowhere else). ``FragmentReader`` reads the boxes off the pipe;
``keyframe_track`` / ``starts_with_keyframe`` look inside a fragment's ``moof`` for that.

Box layout (ISO/IEC 14496-12): 32-bit big-endian size (1: a 64-bit size follows the type),
4-byte type, payload. Full boxes start their payload with 1 byte version + 3 bytes flags.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

NON_SYNC = 0x10000  # sample_is_non_sync_sample in sample flags


def boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box in ``data[start:end]``."""
    end = len(data) if end is None else end
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, at + 8)[0]
            header = 16
        elif size == 0:
            size = end - at
        if size < header or at + size > end:
            return
        yield kind, at + header, at + size
        at += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for k, s, e in boxes(data, start, end):
        if k == kind:
            return s, e
    return None


@dataclass(frozen=True)
class Segment:
    """One piece of the stream: the init segment or a fragment (its bytes, and for a fragment
    whether its video starts with a keyframe, and the span of time its video covers)."""

    data: bytes
    init: bool = False
    keyframe: bool = False
    start: float = 0.0   # seconds: the first video frame's time
    end: float = 0.0     # ... and the time after its last


class FragmentReader:
    """Reads ffmpeg's fragmented MP4 from ``pipe`` and yields ``Segment``s: the init segment
    first, then one per ``moof`` + ``mdat`` pair. ``video_track``: the track ID of the video
    (1 when video is mapped first)."""

    def __init__(self, pipe: BinaryIO, video_track: int = 1):
        self.pipe = pipe
        self.video_track = video_track
        self._trex: dict[int, tuple[int, int]] = {}  # track -> (default sample duration, flags)
        self._timescale: dict[int, int] = {}

    def _box(self) -> tuple[bytes, bytes] | None:
        header = self._read(8)
        if header is None:
            return None
        size, kind = struct.unpack(">I4s", header)
        extra = b""
        if size == 1:
            extra = self._read(8)
            if extra is None:
                return None
            size = struct.unpack(">Q", extra)[0]
        body = self._read(size - len(header) - len(extra))
        if body is None:
            return None
        return kind, header + extra + body

    def _read(self, n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = self.pipe.read(n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def __iter__(self) -> Iterator[Segment]:
        init = b""
        moof = b""
        while (box := self._box()) is not None:
            kind, data = box
            if kind in (b"ftyp", b"moov"):
                init += data
                if kind == b"moov":
                    self._read_moov(data)
                    yield Segment(init, init=True)
            elif kind == b"moof":
                moof = data
            elif kind == b"mdat" and moof:
                keyframe, start, end = self._video_span(moof)
                yield Segment(moof + data, keyframe=keyframe, start=start, end=end)
                moof = b""

    def _read_moov(self, moov: bytes) -> None:
        """Each track's timescale (mdhd) and default sample flags (mvex/trex)."""
        for kind, s, e in boxes(moov, 8):
            if kind == b"trak":
                tkhd = _child(moov, s, e, b"tkhd")
                mdia = _child(moov, s, e, b"mdia")
                if tkhd is None or mdia is None:
                    continue
                version = moov[tkhd[0]]
                track_id = struct.unpack_from(">I", moov, tkhd[0] + (20 if version == 1 else 12))[0]
                mdhd = _child(moov, mdia[0], mdia[1], b"mdhd")
                if mdhd is not None:
                    v = moov[mdhd[0]]
                    self._timescale[track_id] = struct.unpack_from(">I", moov, mdhd[0] + (20 if v == 1 else 12))[0]
            elif kind == b"mvex":
                for k, ts, _ in boxes(moov, s, e):
                    if k == b"trex":
                        track_id, _desc, duration, _size, flags = struct.unpack_from(">IIIII", moov, ts + 4)
                        self._trex[track_id] = (duration, flags)

    def _video_span(self, moof: bytes) -> tuple[bool, float, float]:
        """(does the video start with a keyframe, its start and end time in seconds)."""
        for kind, s, e in boxes(moof, 8):
            if kind != b"traf":
                continue
            tfhd = _child(moof, s, e, b"tfhd")
            if tfhd is None:
                continue
            tf_flags = struct.unpack_from(">I", moof, tfhd[0])[0] & 0xFFFFFF
            track_id = struct.unpack_from(">I", moof, tfhd[0] + 4)[0]
            if track_id != self.video_track:
                continue
            duration, flags = self._trex.get(track_id, (0, 0))
            at = tfhd[0] + 8
            for bit, size in ((0x1, 8), (0x2, 4)):  # base data offset, sample description index
                if tf_flags & bit:
                    at += size
            if tf_flags & 0x8:
                duration = struct.unpack_from(">I", moof, at)[0]
                at += 4
            if tf_flags & 0x10:
                at += 4  # default sample size
            if tf_flags & 0x20:
                flags = struct.unpack_from(">I", moof, at)[0]
            scale = self._timescale.get(track_id, 1)
            start_ticks = 0
            tfdt = _child(moof, s, e, b"tfdt")
            if tfdt is not None:
                version = moof[tfdt[0]]
                start_ticks = struct.unpack_from(">Q" if version == 1 else ">I", moof, tfdt[0] + 4)[0]
            trun = _child(moof, s, e, b"trun")
            if trun is None:
                return False, start_ticks / scale, start_ticks / scale
            tr_flags = struct.unpack_from(">I", moof, trun[0])[0] & 0xFFFFFF
            count = struct.unpack_from(">I", moof, trun[0] + 4)[0]
            at = trun[0] + 8 + (4 if tr_flags & 0x1 else 0)
            first_flags = None
            if tr_flags & 0x4:
                first_flags = struct.unpack_from(">I", moof, at)[0]
                at += 4
            fields = [bit for bit in (0x100, 0x200, 0x400, 0x800) if tr_flags & bit]
            ticks = 0
            for i in range(count):
                sample_duration, sample_flags = duration, flags
                for bit in fields:
                    value = struct.unpack_from(">I", moof, at)[0]
                    at += 4
                    if bit == 0x100:
                        sample_duration = value
                    elif bit == 0x400:
                        sample_flags = value
                if i == 0:
                    first_flags = first_flags if first_flags is not None else sample_flags
                ticks += sample_duration
            keyframe = count > 0 and not (first_flags or 0) & NON_SYNC
            return keyframe, start_ticks / scale, (start_ticks + ticks) / scale
        return False, 0.0, 0.0


def codecs(init: bytes) -> str:
    """The RFC 6381 codecs string of an init segment (e.g. ``avc1.64001f,mp4a.40.2``), what
    ``MediaSource.isTypeSupported`` / ``addSourceBuffer`` need."""
    found = []
    at = init.find(b"avcC")
    if at >= 4:
        profile, compat, level = init[at + 5], init[at + 6], init[at + 7]
        found.append(f"avc1.{profile:02x}{compat:02x}{level:02x}")
    if b"mp4a" in init:
        found.append("mp4a.40.2")
    return ",".join(found)
