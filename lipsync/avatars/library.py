"""The avatar library: uploaded avatars, prepared once, kept on disk, used by id.

Layout (``Settings.avatars_dir``, a folder every node of a cluster can share)::

    <avatars_dir>/<id>/avatar.json      what the API shows, plus the owner's key id
    <avatars_dir>/<id>/image.png        the avatar at output size, upright (EXIF applied)
    <avatars_dir>/<id>/thumbnail.jpg    256 px on its long side, for pickers
    <avatars_dir>/<id>/prepared-<key>.pkl  each model's per-avatar preparation (face box,
                                        mouth geometry, fields, masks) and the idle-motion
                                        rig, one file per model, named and checked by the
                                        model's engine, checkpoint and version (pickle,
                                        zlib-compressed)
    <avatars_dir>/<id>/base.mp4         a video avatar's footage, its ping-pong cycle at
    <avatars_dir>/<id>/track.json       output size, and where its face is in every frame
                                        (``lipsync.avatars.video``); image.png is then the
                                        reference frame the engine prepared

Everything expensive (decoding, face detection, landmarks, the engine's preparation)
happens in ``add`` (for the avatar's model: its preferred one, else the default); a folder
appears under its final name only when complete (written under a temporary name, then
renamed), so a crash never leaves half an avatar. Another model's preparation is made from
``image.png`` the first time a request asks for it, then stored too; after a restart
``prepared`` reads the stored one (made again when the model's checkpoint or version changed).

Ownership: an avatar belongs to the API key that uploaded it (its key id, a short hash;
None without keys). Another key's avatar is "not found" (404), not "forbidden", so ids
cannot be probed. The preloaded avatar (``AVATAR_PATH`` or the built-in portrait) is the
entry ``default``, visible to everyone and never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

from lipsync.avatars.video import VideoBase
from lipsync.engines.base import PreparedAvatar
from lipsync.engines.models import ModelSet
from lipsync.errors import InvalidInputError, LipsyncError, NoFaceError, RefusedError
from lipsync.faces.box import FaceBox
from lipsync.faces.landmarks import face_landmarks

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
ID_PATTERN = re.compile(r"^av_[0-9a-f]{16}$")
MAX_NAME_CHARS = 80
THUMBNAIL_PX = 256
PREPARED_IN_MEMORY = 8     # prepared avatars kept in memory (a builtin one is ~10-40 MB)
META, IMAGE, THUMBNAIL, PREPARED = "avatar.json", "image.png", "thumbnail.jpg", "prepared"


@dataclass(frozen=True)
class AvatarRecord:
    """One library entry as stored in ``avatar.json``."""

    id: str
    name: str
    kind: str                  # "image" or "video"
    width: int                 # the avatar at output size, pixels
    height: int
    fps: float | None          # None for an image; a video's output frame rate
    frames: int                # 1 for an image
    face_box: list[int]        # [x1, y1, x2, y2] on the avatar at output size (a video: its reference frame)
    created_at: float          # unix seconds
    owner: str | None = None   # the uploading key's id (never shown)
    duration: float | None = None                 # a video's seconds (one pass, forward)
    face_boxes: list[list[int] | None] | None = None  # a video's box per frame, smoothed; None: face lost
    model: str | None = None   # the preferred model of requests on this avatar (None: the default)

    def public(self) -> dict:
        """What the API shows (no owner)."""
        info = asdict(self)
        info.pop("owner")
        return info


class AvatarLibrary:
    """Avatars on disk plus a small in-memory cache of their models' preparations.

    ``models``: the loaded ``ModelSet``. ``prepare_image(image_bgr, model) -> PreparedAvatar``
    is the service's (face box found on the image as uploaded, then everything scaled to
    output size and prepared by ``model``; None: the default); ``prepare_scaled(image_bgr,
    box, model, idle=True)`` prepares a stored picture (already at output size, its box
    known), with the idle-motion rig or without; ``find_faces(image_bgr) -> [FaceBox]``
    counts the faces of an upload; ``register_video(data, folder)`` decodes, tracks and
    stores a clip (``lipsync.avatars.video``). Thread-safe.
    """

    def __init__(self, root: str, models: ModelSet, prepare_image, prepare_scaled, find_faces, *,
                 register_video=None, max_per_owner: int = 100):
        self.root = root
        self.models = models
        self._prepare_image = prepare_image
        self._prepare_scaled = prepare_scaled
        self._find_faces = find_faces
        self._register_video = register_video  # (data, folder) -> lipsync.avatars.video.RegisteredVideo
        self.max_per_owner = max_per_owner
        self._default: tuple[AvatarRecord, dict[str, PreparedAvatar], bytes] | None = None
        self._cache: OrderedDict[tuple[str, str], PreparedAvatar] = OrderedDict()  # (id, model)
        self._lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    # ---------------------------------------------------------------- the default entry
    def set_default(self, prepared: PreparedAvatar, name: str) -> None:
        """Make the preloaded avatar (``prepared`` by the default model) the ``default`` entry
        (kept in memory only; other models prepare it when first asked)."""
        h, w = prepared.image.shape[:2]
        record = AvatarRecord(id=DEFAULT_ID, name=name, kind="image", width=w, height=h, fps=None, frames=1,
                              face_box=prepared.box.as_list(), created_at=time.time())
        self._default = (record, {self.models.default: prepared}, _thumbnail(prepared.image))

    # ---------------------------------------------------------------- queries
    def get(self, avatar_id: str, owner: str | None) -> AvatarRecord:
        """The entry ``avatar_id`` as ``owner`` may see it; 404 ``unknown_avatar`` otherwise."""
        if avatar_id == DEFAULT_ID and self._default is not None:
            return self._default[0]
        record = self._read(avatar_id)
        if record is None or record.owner != owner:
            raise LipsyncError(f"no avatar with id {avatar_id!r}", code="unknown_avatar", status=404)
        return record

    def list(self, owner: str | None) -> list[AvatarRecord]:
        """``owner``'s avatars, newest first, after the default entry."""
        records = []
        for name in os.listdir(self.root):
            record = self._read(name) if ID_PATTERN.match(name) else None
            if record is not None and record.owner == owner:
                records.append(record)
        records.sort(key=lambda r: r.created_at, reverse=True)
        return ([self._default[0]] if self._default is not None else []) + records

    def thumbnail(self, avatar_id: str, owner: str | None) -> bytes:
        """The entry's thumbnail (JPEG bytes)."""
        self.get(avatar_id, owner)
        if avatar_id == DEFAULT_ID:
            return self._default[2]
        with open(os.path.join(self.root, avatar_id, THUMBNAIL), "rb") as f:
            return f.read()

    def image(self, avatar_id: str, owner: str | None) -> bytes:
        """The entry's picture at output size (JPEG bytes), as the video shows it."""
        self.get(avatar_id, owner)
        image = self._default[1][self.models.default].image if avatar_id == DEFAULT_ID else \
            cv2.imread(os.path.join(self.root, avatar_id, IMAGE), cv2.IMREAD_COLOR)
        if image is None:
            raise LipsyncError(f"avatar {avatar_id} is damaged on disk", code="avatar_damaged", status=500)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        return jpeg.tobytes()

    def prepared(self, avatar_id: str, owner: str | None, model: str | None = None) -> PreparedAvatar:
        """``model``'s (default: the default model's) preparation of the entry: from memory, else
        from disk, else made from the stored picture and stored."""
        record = self.get(avatar_id, owner)
        model = model or self.models.default
        if avatar_id == DEFAULT_ID:
            return self._default_prepared(model)
        key = (avatar_id, model)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        folder = os.path.join(self.root, avatar_id)
        prepared = self._load_prepared(folder, model)
        if prepared is None:
            image = cv2.imread(os.path.join(folder, IMAGE), cv2.IMREAD_COLOR)
            if image is None:
                raise LipsyncError(f"avatar {avatar_id} is damaged on disk", code="avatar_damaged", status=500)
            # (a video's footage moves by itself: no idle rig)
            prepared = self._prepare_scaled(image, FaceBox(*record.face_box), model, idle=record.kind == "image")
            self._store_prepared(folder, prepared, model)
        if record.kind == "video":
            try:
                prepared = replace(prepared, video=VideoBase.load(folder))
            except (OSError, ValueError, KeyError, TypeError):
                raise LipsyncError(f"avatar {avatar_id} is damaged on disk", code="avatar_damaged",
                                   status=500) from None
        self._remember(key, prepared)
        return prepared

    def _default_prepared(self, model: str) -> PreparedAvatar:
        prepared = self._default[1]
        found = prepared.get(model)
        if found is None:  # another model's first request on the preloaded avatar
            first = prepared[self.models.default]
            found = self._prepare_scaled(first.image, first.box, model)
            with self._lock:
                found = prepared.setdefault(model, found)
        return found

    def _remember(self, key: tuple[str, str], prepared: PreparedAvatar) -> None:
        with self._lock:
            self._cache[key] = prepared
            self._cache.move_to_end(key)
            while len(self._cache) > PREPARED_IN_MEMORY:
                self._cache.popitem(last=False)

    # ---------------------------------------------------------------- changes
    def add(self, image_bgr: np.ndarray, name: str | None, owner: str | None,
            model: str | None = None) -> AvatarRecord:
        """Check, prepare and store an uploaded image; returns its new entry.

        Raises 422 ``no_face`` / ``several_faces`` (exactly one face is needed),
        400 ``invalid_name``, 429 ``too_many_avatars`` past ``max_per_owner``."""
        name = _clean_name(name)
        self._check_room(owner)
        faces = self._find_faces(image_bgr)
        if len(faces) > 1:
            # The detector also fires on face-like patterns; a second face counts only when
            # the face mesh sees one there too.
            faces = [box for box in faces if face_landmarks(image_bgr, box) is not None] or faces[:1]
        if not faces:
            raise NoFaceError("no face found in the uploaded avatar (frame 0)", code="no_face")
        if len(faces) > 1:
            boxes = ", ".join(str(b.as_list()) for b in faces[:4])
            raise NoFaceError(f"the uploaded avatar shows {len(faces)} faces (frame 0: {boxes}); "
                              "an avatar needs exactly one", code="several_faces")
        prepared = self._prepare_image(image_bgr, model)
        h, w = prepared.image.shape[:2]
        record = AvatarRecord(id=_new_id(), name=name or "avatar", kind="image", width=w,
                              height=h, fps=None, frames=1, face_box=prepared.box.as_list(),
                              created_at=time.time(), owner=owner, model=model)
        return self._store(record, prepared, self._staging(record.id))

    def add_video(self, data: bytes, name: str | None, owner: str | None, model: str | None = None) -> AvatarRecord:
        """Register an uploaded clip (``lipsync.avatars.video``: decoded, tracked and stored once);
        returns its new entry. Errors as ``add`` and ``register_video``."""
        name = _clean_name(name)
        self._check_room(owner)
        avatar_id = _new_id()
        staging = self._staging(avatar_id)
        try:
            os.makedirs(staging)
            found = self._register_video(data, staging)
            prepared = self._prepare_scaled(found.image, found.box, model, idle=False)
            found.base.save_track(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        base = found.base
        record = AvatarRecord(id=avatar_id, name=name or "video avatar", kind="video", width=base.width,
                              height=base.height, fps=round(float(base.fps), 3), frames=base.frames,
                              face_box=found.box.as_list(), created_at=time.time(), owner=owner,
                              duration=round(base.frames / float(base.fps), 3), face_boxes=base.boxes(found.box),
                              model=model)
        self._store(record, prepared, staging)
        log.info("video avatar %s added (%dx%d, %d frames at %s fps, face %s)", avatar_id, base.width,
                 base.height, base.frames, base.fps, record.face_box)
        return record

    def _staging(self, avatar_id: str) -> str:
        return os.path.join(self.root, f".new-{avatar_id}")

    def _store(self, record: AvatarRecord, prepared: PreparedAvatar, staging: str) -> AvatarRecord:
        """Write the entry's files into ``staging`` (made here if missing), then rename it to its id."""
        final = os.path.join(self.root, record.id)
        try:
            os.makedirs(staging, exist_ok=True)
            if not cv2.imwrite(os.path.join(staging, IMAGE), prepared.image):
                raise LipsyncError("could not store the avatar image", code="storage_failed", status=500)
            with open(os.path.join(staging, THUMBNAIL), "wb") as f:
                f.write(_thumbnail(prepared.image))
            self._store_prepared(staging, prepared, record.model or self.models.default)
            with open(os.path.join(staging, META), "w", encoding="utf-8") as f:
                json.dump(asdict(record), f)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if record.kind == "video":
            prepared = replace(prepared, video=VideoBase.load(final))
        self._remember((record.id, record.model or self.models.default), prepared)
        if record.kind == "image":
            log.info("avatar %s added (%dx%d, face %s)", record.id, record.width, record.height, record.face_box)
        return record

    def _check_room(self, owner: str | None) -> None:
        if sum(1 for r in self.list(owner) if r.id != DEFAULT_ID) >= self.max_per_owner:
            raise RefusedError(f"this key already has {self.max_per_owner} avatars; delete one first",
                               code="too_many_avatars", status=429)

    def delete(self, avatar_id: str, owner: str | None) -> None:
        """Remove ``owner``'s entry and its files (the default entry cannot be deleted: 409)."""
        if avatar_id == DEFAULT_ID:
            raise LipsyncError("the default avatar cannot be deleted (it is AVATAR_PATH)",
                               code="avatar_is_default", status=409)
        self.get(avatar_id, owner)
        folder = os.path.join(self.root, avatar_id)
        # Rename first: readers see it gone at once, and a crash mid-delete leaves a
        # hidden folder, never half an avatar under its id.
        doomed = os.path.join(self.root, f".deleted-{avatar_id}-{secrets.token_hex(4)}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        with self._lock:
            for key in [k for k in self._cache if k[0] == avatar_id]:
                del self._cache[key]

    # ---------------------------------------------------------------- storage
    def _read(self, avatar_id: str) -> AvatarRecord | None:
        if not ID_PATTERN.match(avatar_id or ""):
            return None
        try:
            with open(os.path.join(self.root, avatar_id, META), encoding="utf-8") as f:
                return AvatarRecord(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    def _engine_key(self, model: str) -> dict:
        info = self.models.engine(model).describe()
        return {"model": model, **{k: v for k, v in info.items() if k in ("engine", "checkpoint", "version", "device")}}

    def _prepared_file(self, folder: str, model: str) -> str:
        key = hashlib.sha256(json.dumps(self._engine_key(model), sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(folder, f"{PREPARED}-{key}.pkl")

    def _store_prepared(self, folder: str, prepared: PreparedAvatar, model: str) -> None:
        prepared = replace(prepared, video=None)  # a video's footage is stored beside it, found again at load
        try:
            data = zlib.compress(pickle.dumps({"engine": self._engine_key(model), "prepared": prepared},
                                              protocol=pickle.HIGHEST_PROTOCOL), 1)
        except Exception as exc:  # noqa: BLE001 - an engine state that cannot be pickled is prepared per load
            log.warning("model %s's preparation cannot be stored (%s); it is made again after restarts", model, exc)
            return
        path = self._prepared_file(folder, model)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)

    def _load_prepared(self, folder: str, model: str) -> PreparedAvatar | None:
        try:
            with open(self._prepared_file(folder, model), "rb") as f:
                stored = pickle.loads(zlib.decompress(f.read()))  # written by this service into its own storage
        except (OSError, zlib.error, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError):
            return None
        if not isinstance(stored, dict) or stored.get("engine") != self._engine_key(model):
            return None
        prepared = stored.get("prepared")
        return prepared if isinstance(prepared, PreparedAvatar) else None


def _new_id() -> str:
    return "av_" + secrets.token_hex(8)


def _clean_name(name) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidInputError("'name' must be a string", code="invalid_name")
    name = " ".join(name.split())
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInputError(f"'name' has {len(name)} characters; the limit is {MAX_NAME_CHARS}",
                                code="invalid_name")
    return name or None


def _thumbnail(image: np.ndarray) -> bytes:
    h, w = image.shape[:2]
    scale = THUMBNAIL_PX / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return jpeg.tobytes()
