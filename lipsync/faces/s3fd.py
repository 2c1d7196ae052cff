"""S3FD face detector: the network and detection pipeline Wav2Lip was trained with.

The architecture reproduces ``face_detection/detection/sfd/net_s3fd.py`` of
Wav2Lip (itself taken from face-alignment) layer for layer, with the same
attribute names, so ``state_dict()`` keys match the published weights
``s3fd-619a316812.pth`` (usually saved as ``s3fd.pth``) and they load with
``strict=True``:

* VGG16 trunk ``conv1_1`` .. ``conv5_3`` (3x3 convs, 2x2 max-pools after
  conv1_2, conv2_2, conv3_3, conv4_3, conv5_3), ``fc6`` (3x3, padding 3, as in
  the original), ``fc7`` (1x1), extra layers ``conv6_1/conv6_2`` and
  ``conv7_1/conv7_2`` (stride 2).
* ``L2Norm`` on conv3_3 / conv4_3 / conv5_3 with initial scales 10 / 8 / 5
  (one learnt ``weight`` per channel).
* Six heads ``*_mbox_conf`` (2 classes; conv3_3's has 4 channels: 3
  background scores max-out into one) and ``*_mbox_loc`` (4 offsets), at
  strides 4, 8, 16, 32, 64, 128 with one square anchor of 4 x stride each.

Pipeline (as the original): BGR uint8 image minus the mean
[104, 117, 123], forward, softmax of the class scores, decode the anchors
with variances [0.1, 0.2], non-maximum suppression at IoU 0.3, keep scores
above 0.5. Unlike the original, big images are first shrunk so their longest
side is at most ``max_side`` pixels (default 640; boxes are scaled back),
which keeps CPU time bounded and keeps large faces inside the anchor range
(16 .. 512 px).

Note: Wav2Lip's own batch wrapper flips frames to RGB before this mean
subtraction; the network was trained (Caffe, SFD) on BGR, which face-alignment
feeds and which we feed. The difference moves boxes by a pixel or two.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipsync.devices import resolve_device
from lipsync.errors import CheckpointError
from lipsync.faces.box import FaceBox

MEAN_BGR = (104.0, 117.0, 123.0)
STRIDES = (4, 8, 16, 32, 64, 128)
VARIANCES = (0.1, 0.2)
ANCHOR_SCALE = 4  # anchor side = 4 x stride (16 .. 512 px)
MIN_INPUT_SIDE = 32  # the network's five 2x2 max-pools need at least this many pixels


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnt per-channel scale.

    Input and output ``(N, C, H, W)``; parameter ``weight`` ``(C,)``
    initialised to ``scale``.
    """

    def __init__(self, n_channels: int, scale: float = 1.0):
        super().__init__()
        self.n_channels = n_channels
        self.scale = scale
        self.eps = 1e-10
        self.weight = nn.Parameter(torch.full((n_channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


class S3FD(nn.Module):
    """The S3FD network (VGG16 single-shot detector), published-weights layout.

    ``forward(x)`` takes ``(N, 3, H, W)`` float32: BGR pixel values in
    0..255 minus ``MEAN_BGR``. It returns 12 tensors
    ``[cls1, reg1, ..., cls6, reg6]``: ``cls_i`` ``(N, 2, H_i, W_i)`` raw
    logits (background, face; softmax not applied, as in the original) and
    ``reg_i`` ``(N, 4, H_i, W_i)`` anchor offsets, for strides
    ``STRIDES[i]``. ``H_i = H / stride`` (floored at each pool), except the
    fc7 map (stride 32), which is ``H / 32 + 4`` because fc6 pads by 3 as in
    the original (its extra anchors lie past the right and bottom edges).
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d
        self.conv1_1 = conv(3, 64, kernel_size=3, stride=1, padding=1)
        self.conv1_2 = conv(64, 64, kernel_size=3, stride=1, padding=1)

        self.conv2_1 = conv(64, 128, kernel_size=3, stride=1, padding=1)
        self.conv2_2 = conv(128, 128, kernel_size=3, stride=1, padding=1)

        self.conv3_1 = conv(128, 256, kernel_size=3, stride=1, padding=1)
        self.conv3_2 = conv(256, 256, kernel_size=3, stride=1, padding=1)
        self.conv3_3 = conv(256, 256, kernel_size=3, stride=1, padding=1)

        self.conv4_1 = conv(256, 512, kernel_size=3, stride=1, padding=1)
        self.conv4_2 = conv(512, 512, kernel_size=3, stride=1, padding=1)
        self.conv4_3 = conv(512, 512, kernel_size=3, stride=1, padding=1)

        self.conv5_1 = conv(512, 512, kernel_size=3, stride=1, padding=1)
        self.conv5_2 = conv(512, 512, kernel_size=3, stride=1, padding=1)
        self.conv5_3 = conv(512, 512, kernel_size=3, stride=1, padding=1)

        self.fc6 = conv(512, 1024, kernel_size=3, stride=1, padding=3)
        self.fc7 = conv(1024, 1024, kernel_size=1, stride=1, padding=0)

        self.conv6_1 = conv(1024, 256, kernel_size=1, stride=1, padding=0)
        self.conv6_2 = conv(256, 512, kernel_size=3, stride=2, padding=1)

        self.conv7_1 = conv(512, 128, kernel_size=1, stride=1, padding=0)
        self.conv7_2 = conv(128, 256, kernel_size=3, stride=2, padding=1)

        self.conv3_3_norm = L2Norm(256, scale=10)
        self.conv4_3_norm = L2Norm(512, scale=8)
        self.conv5_3_norm = L2Norm(512, scale=5)

        self.conv3_3_norm_mbox_conf = conv(256, 4, kernel_size=3, stride=1, padding=1)
        self.conv3_3_norm_mbox_loc = conv(256, 4, kernel_size=3, stride=1, padding=1)
        self.conv4_3_norm_mbox_conf = conv(512, 2, kernel_size=3, stride=1, padding=1)
        self.conv4_3_norm_mbox_loc = conv(512, 4, kernel_size=3, stride=1, padding=1)
        self.conv5_3_norm_mbox_conf = conv(512, 2, kernel_size=3, stride=1, padding=1)
        self.conv5_3_norm_mbox_loc = conv(512, 4, kernel_size=3, stride=1, padding=1)

        self.fc7_mbox_conf = conv(1024, 2, kernel_size=3, stride=1, padding=1)
        self.fc7_mbox_loc = conv(1024, 4, kernel_size=3, stride=1, padding=1)
        self.conv6_2_mbox_conf = conv(512, 2, kernel_size=3, stride=1, padding=1)
        self.conv6_2_mbox_loc = conv(512, 4, kernel_size=3, stride=1, padding=1)
        self.conv7_2_mbox_conf = conv(256, 2, kernel_size=3, stride=1, padding=1)
        self.conv7_2_mbox_loc = conv(256, 4, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # VGG-16 stages (ReLU after every convolution, 2x2 max-pooling between stages), then the
        # extra layers; the detection heads read six of the feature maps.
        h = F.max_pool2d(_relu_chain(x, self.conv1_1, self.conv1_2), 2, 2)
        h = F.max_pool2d(_relu_chain(h, self.conv2_1, self.conv2_2), 2, 2)
        f3_3 = _relu_chain(h, self.conv3_1, self.conv3_2, self.conv3_3)
        f4_3 = _relu_chain(F.max_pool2d(f3_3, 2, 2), self.conv4_1, self.conv4_2, self.conv4_3)
        f5_3 = _relu_chain(F.max_pool2d(f4_3, 2, 2), self.conv5_1, self.conv5_2, self.conv5_3)
        ffc7 = _relu_chain(F.max_pool2d(f5_3, 2, 2), self.fc6, self.fc7)
        f6_2 = _relu_chain(ffc7, self.conv6_1, self.conv6_2)
        f7_2 = _relu_chain(f6_2, self.conv7_1, self.conv7_2)

        f3_3 = self.conv3_3_norm(f3_3)
        f4_3 = self.conv4_3_norm(f4_3)
        f5_3 = self.conv5_3_norm(f5_3)

        cls1 = self.conv3_3_norm_mbox_conf(f3_3)
        reg1 = self.conv3_3_norm_mbox_loc(f3_3)
        cls2 = self.conv4_3_norm_mbox_conf(f4_3)
        reg2 = self.conv4_3_norm_mbox_loc(f4_3)
        cls3 = self.conv5_3_norm_mbox_conf(f5_3)
        reg3 = self.conv5_3_norm_mbox_loc(f5_3)
        cls4 = self.fc7_mbox_conf(ffc7)
        reg4 = self.fc7_mbox_loc(ffc7)
        cls5 = self.conv6_2_mbox_conf(f6_2)
        reg5 = self.conv6_2_mbox_loc(f6_2)
        cls6 = self.conv7_2_mbox_conf(f7_2)
        reg6 = self.conv7_2_mbox_loc(f7_2)

        # max-out background label: the first 3 channels are background scores
        bmax = torch.max(torch.max(cls1[:, 0:1], cls1[:, 1:2]), cls1[:, 2:3])
        cls1 = torch.cat([bmax, cls1[:, 3:4]], dim=1)

        return [cls1, reg1, cls2, reg2, cls3, reg3, cls4, reg4, cls5, reg5, cls6, reg6]


def _relu_chain(h: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    """``h`` through each of ``layers`` in turn, a ReLU after each."""
    for layer in layers:
        h = F.relu(layer(h))
    return h


# ---------------------------------------------------------------- decoding


def decode(
    outputs: Sequence[np.ndarray | torch.Tensor],
    score_threshold: float = 0.5,
    pre_nms_top_k: int = 5000,
) -> np.ndarray:
    """Anchor boxes of one image from the network's (softmaxed) outputs.

    ``outputs`` is ``[cls1, reg1, ..., cls6, reg6]`` for a batch of one:
    ``cls_i`` ``(1, 2, H_i, W_i)`` class *probabilities* (background, face),
    ``reg_i`` ``(1, 4, H_i, W_i)`` offsets ``(dx, dy, dw, dh)``. Level ``i``
    has stride ``s = STRIDES[i]``; cell ``(h, w)`` holds an anchor centred at
    ``(s/2 + w*s, s/2 + h*s)`` with side ``4*s`` pixels, decoded SSD-style::

        centre = anchor_centre + (dx, dy) * 0.1 * side
        size   = side * exp((dw, dh) * 0.2)

    Returns ``(N, 5)`` float32 ``[x1, y1, x2, y2, score]`` in pixels of the
    network input, for every anchor whose face probability is above
    ``score_threshold`` (at most the ``pre_nms_top_k`` best), unsorted.
    """
    if len(outputs) != 2 * len(STRIDES):
        raise ValueError(f"expected {2 * len(STRIDES)} output maps, got {len(outputs)}")
    found = []
    for i, stride in enumerate(STRIDES):
        cls = _as_numpy(outputs[2 * i])
        reg = _as_numpy(outputs[2 * i + 1])
        scores = cls[0, 1]
        hs, ws = np.nonzero(scores > score_threshold)
        if hs.size == 0:
            continue
        side = float(ANCHOR_SCALE * stride)
        acx = stride / 2.0 + ws * stride
        acy = stride / 2.0 + hs * stride
        loc = reg[0][:, hs, ws]  # (4, K)
        cx = acx + loc[0] * VARIANCES[0] * side
        cy = acy + loc[1] * VARIANCES[0] * side
        w = side * np.exp(loc[2] * VARIANCES[1])
        h = side * np.exp(loc[3] * VARIANCES[1])
        found.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, scores[hs, ws]], axis=1))
    if not found:
        return np.zeros((0, 5), np.float32)
    dets = np.concatenate(found).astype(np.float32)
    if len(dets) > pre_nms_top_k:
        dets = dets[np.argsort(-dets[:, 4], kind="stable")[:pre_nms_top_k]]
    return dets


def nms(dets: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Greedy non-maximum suppression, as in the original S3FD code.

    ``dets`` ``(N, 5)`` ``[x1, y1, x2, y2, score]``; boxes are treated as
    inclusive pixel ranges (areas use ``+1``, like the original). Returns the
    indices kept, best score first: a box is dropped when its IoU with a kept,
    higher-scoring box is above ``threshold``.
    """
    if len(dets) == 0:
        return np.zeros((0,), np.int64)
    x1, y1, x2, y2, scores = (dets[:, k].astype(np.float64) for k in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return np.asarray(keep, np.int64)


def postprocess(
    outputs: Sequence[np.ndarray | torch.Tensor],
    score_threshold: float = 0.5,
    nms_threshold: float = 0.3,
    softmax: bool = True,
) -> np.ndarray:
    """Detections ``(N, 5)`` ``[x1, y1, x2, y2, score]`` from raw network outputs.

    ``softmax=True`` applies the class softmax first (``S3FD.forward`` returns
    logits). Order: best score first. Thresholding before NMS keeps the same
    boxes as the original's NMS-then-threshold, because suppression only runs
    from higher to lower scores.
    """
    outs = list(outputs)
    if softmax:
        for i in range(0, len(outs), 2):
            outs[i] = _softmax_channels(_as_numpy(outs[i]))
    dets = decode(outs, score_threshold)
    return dets[nms(dets, nms_threshold)]


def _softmax_channels(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


# ---------------------------------------------------------------- weights


def load_state_dict(path: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """Read S3FD weights and return them keyed like ``S3FD().state_dict()``.

    Accepts a bare state dict or ``{'state_dict': ...}`` (also ``'model'`` /
    ``'net'``), keys with or without a ``module.`` prefix. Loads with
    ``torch.load(weights_only=True)``: no code in the file is run. Raises
    ``CheckpointError`` when the file is missing, unreadable, or does not
    hold every S3FD tensor in the right shape.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"S3FD weights not found at {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {first}" if first and len(first) <= 120 else type(exc).__name__
        raise CheckpointError(
            f"could not read S3FD weights {path}: not a PyTorch weights file, truncated or corrupt, "
            f"or pickled with objects that safe (weights_only) loading refuses ({detail})"
        ) from None
    state = _unwrap(obj)
    if state is None:
        raise CheckpointError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    state = OrderedDict((_strip_prefix(k), v) for k, v in state.items())
    with torch.device("meta"):  # shapes only, no memory or init time
        reference = S3FD().state_dict()
    _check_against(state, reference, path)
    return state


def _unwrap(obj) -> Mapping | None:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "net"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    return None


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _check_against(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path} is not an S3FD checkpoint: keys {'; '.join(parts)}")
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path} is not an S3FD checkpoint: {k} has shape {tuple(state[k].shape)}, expected {tuple(ref.shape)}"
            )
        if not state[k].is_floating_point():
            raise CheckpointError(f"{path} is not an S3FD checkpoint: {k} is {state[k].dtype}, expected floats")


# ---------------------------------------------------------------- detector


class S3FDDetector:
    """Face detection with the published S3FD weights.

    ``S3FDDetector(weights_path, device)`` loads the weights once (raises
    ``CheckpointError`` on a missing, corrupt or mismatched file); the model is
    then shared read-only: ``detect`` never mutates it and is safe to call from
    several threads.

    Attributes: ``name`` = ``"s3fd"``, ``cache_id`` (identifies weights and
    settings, for result caches), ``weights_path``, ``device``.
    """

    name = "s3fd"

    def __init__(
        self,
        weights_path: str | os.PathLike,
        device: str = "cpu",
        *,
        max_side: int = 640,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.3,
    ):
        self.weights_path = Path(weights_path)
        self.device = resolve_device(device)
        self.max_side = int(max_side)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        state = load_state_dict(self.weights_path)
        net = S3FD()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # belt and braces: _check_against already compared
            raise CheckpointError(f"{self.weights_path} does not fit the S3FD network: {exc}") from None
        net.eval().requires_grad_(False)
        self.net = net.to(self.device)
        digest = hashlib.sha256()
        for k, v in state.items():
            digest.update(k.encode())
            digest.update(v.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
        self.weights_digest = digest.hexdigest()[:16]
        self.cache_id = (
            f"s3fd-v1:{self.weights_digest}:side{self.max_side}:"
            f"t{self.score_threshold:g}:n{self.nms_threshold:g}"
        )

    def detect_raw(self, image_bgr: np.ndarray) -> np.ndarray:
        """All detections ``(N, 5)`` float32 ``[x1, y1, x2, y2, score]``.

        ``image_bgr``: ``(H, W, 3)`` uint8 BGR, ``(H, W, 4)`` BGRA or
        ``(H, W)`` grey. Coordinates in pixels of that image (boxes may reach
        past its edges), score = face probability in (0.5, 1], best first.
        """
        img = _to_bgr(image_bgr)
        h, w = img.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(img).to(self.device).permute(2, 0, 1).float()
        x = (x - torch.tensor(MEAN_BGR, device=self.device).view(3, 1, 1)).unsqueeze(0)
        # five 2x2 pools need at least 32 px: pad tiny images right/bottom with the mean (zero here)
        pad_w, pad_h = max(0, MIN_INPUT_SIDE - x.shape[3]), max(0, MIN_INPUT_SIDE - x.shape[2])
        if pad_w or pad_h:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        with torch.inference_mode():
            outputs = self.net(x)
            outputs = [F.softmax(o, dim=1) if i % 2 == 0 else o for i, o in enumerate(outputs)]
            outputs = [o.float().cpu().numpy() for o in outputs]
        dets = postprocess(outputs, self.score_threshold, self.nms_threshold, softmax=False)
        if scale < 1.0:
            dets[:, :4] /= scale
        return dets

    def detect(self, image_bgr: np.ndarray) -> list[tuple[FaceBox, float]]:
        """Faces as ``(FaceBox, probability)``, preferred face first.

        Boxes are rounded to whole pixels and clipped to the image. Order: among
        detections within 0.05 of the best probability, the largest first (the
        avatar's main face), then the rest by probability.
        """
        dets = self.detect_raw(image_bgr)
        h, w = image_bgr.shape[:2]
        out = []
        for x1, y1, x2, y2, s in dets:
            box = FaceBox(int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))).clip(w, h)
            if box.width > 0 and box.height > 0:
                out.append((box, float(s)))
        if not out:
            return []
        best = max(s for _, s in out)
        confident = sorted((d for d in out if d[1] >= best - 0.05), key=lambda d: -d[0].width * d[0].height)
        others = sorted((d for d in out if d[1] < best - 0.05), key=lambda d: -d[1])
        return confident + others

    def describe(self) -> dict:
        return {"detector": "s3fd", "weights": str(self.weights_path), "device": str(self.device),
                "max_side": self.max_side}


def _to_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
