"""The face boxes found so far: in memory (LRU) and on disk, so a restart detects nothing again.

A box is kept under ``key`` (see ``FaceLocator.cache_key``: the SHA-256 of the detector id
and the image's pixels, so a changed image or a different detector/calibration never reuses
a stale box) in memory and in ``<cache_dir>/faces/<key>.json``. The JSON file is written to
a temporary file and moved into place with ``os.replace``, so readers never see half a file;
a file written for another detector or image size, or one that cannot be read, is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

from lipsync.faces.box import FaceBox

log = logging.getLogger(__name__)


class FaceBoxCache:
    """Boxes by key, ``memory_entries`` of them in memory and all of them under ``cache_dir``
    (None: memory only). Not thread-safe on its own: ``FaceLocator`` holds a lock around it."""

    def __init__(self, cache_dir: str | os.PathLike | None, memory_entries: int = 256):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: OrderedDict[str, FaceBox] = OrderedDict()
        self._memory_entries = max(1, int(memory_entries))

    def path(self, key: str) -> Path | None:
        """Where the disk cache keeps ``key``'s box (None without a cache dir)."""
        return None if self.cache_dir is None else self.cache_dir / "faces" / f"{key}.json"

    def from_memory(self, key: str) -> FaceBox | None:
        box = self._memory.get(key)
        if box is not None:
            self._memory.move_to_end(key)
        return box

    def remember(self, key: str, box: FaceBox) -> None:
        self._memory[key] = box
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)

    def from_disk(self, key: str, detector_id: str, width: int, height: int) -> FaceBox | None:
        """The box stored for ``key`` by detector ``detector_id`` for a ``width`` x ``height`` image."""
        path = self.path(key)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable face cache %s: %s", path, exc)
            return None
        try:
            box = FaceBox(*(int(v) for v in data["box"]))
            if data.get("detector_id") != detector_id or data.get("image_size") != [width, height]:
                raise ValueError("written for another detector or image size")
            if not (0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height):
                raise ValueError(f"box {box.as_list()} is not inside {width}x{height}")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring invalid face cache %s: %s", path, exc)
            return None
        return box

    def to_disk(self, key: str, box: FaceBox, record: dict) -> None:
        """Store ``box`` for ``key`` with ``record`` (score, detector, detector_id, image_size)."""
        path = self.path(key)
        if path is None:
            return
        folder = path.parent
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key[:16]}-", suffix=".tmp")
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other workers may run as another user
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"box": box.as_list(), **record}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:  # a read-only or full disk must not fail the request
            log.warning("could not write face cache in %s: %s", folder, exc)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
