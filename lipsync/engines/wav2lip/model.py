"""The Wav2Lip generator and a loader for every checkpoint layout in use.

The architecture follows ``shared/spec/WAV2LIP.md`` exactly: ``Wav2Lip()``'s
``state_dict()`` has the 352 keys, shapes, dtypes and order listed in
``shared/spec/wav2lip_state_dict.json`` (36,298,035 parameters), so the
published weights (``wav2lip.pth``, ``wav2lip_gan.pth``, the TorchScript
``Wav2Lip-SD-GAN.pt`` / ``Wav2Lip-SD-NOGAN.pt`` exports) load into it.

Shapes used throughout:

* mel windows: ``(B, 1, 80, 16)`` float, values in [-4, 4] (``lipsync.media.audio``)
* faces: ``(B, 6, 96, 96)`` float in [0, 1], BGR; channels 0-2 are the crop
  with rows 48..95 zeroed, channels 3-5 the unmasked reference crop
* output: ``(B, 3, 96, 96)`` float in [0, 1], BGR

``load_model`` detects the layout by content (never by file extension) and
raises ``CheckpointError`` with a plain-English reason for anything it cannot
use; ``describe_checkpoint`` reports what a file is without raising, for
health pages.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lipsync.errors import CheckpointError

__all__ = [
    "Conv2d",
    "Conv2dTranspose",
    "Wav2Lip",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_model",
    "describe_checkpoint",
    "PARAMETER_COUNT",
    "FACE_SIZE",
    "StillFaceDecoder",
    "mouth_rows_start",
    "random_generator",
    "save_random_checkpoint",
]

FACE_SIZE = 96          # the model's face crops are FACE_SIZE x FACE_SIZE pixels
MEL_BINS = 80
MEL_STEPS = 16
PARAMETER_COUNT = 36_298_035  # learnable parameters (BatchNorm running stats excluded)

# Prefixes wrappers add to every key: DataParallel / DistributedDataParallel,
# and torch.compile's OptimizedModule.
_KEY_PREFIXES = ("module.", "_orig_mod.")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- model


class Conv2d(nn.Module):
    """conv (with bias) -> BatchNorm2d -> (+ input if ``residual``) -> ReLU.

    Keys: ``conv_block.0`` is the convolution, ``conv_block.1`` the batch norm.
    A residual block needs ``cin == cout`` and a shape-preserving conv.
    """

    def __init__(self, cin: int, cout: int, kernel_size, stride, padding, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    """ConvTranspose2d (with bias) -> BatchNorm2d -> ReLU (keys ``conv_block.0/1``)."""

    def __init__(self, cin: int, cout: int, kernel_size, stride, padding, output_padding=0):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _res(ch: int) -> Conv2d:
    return Conv2d(ch, ch, kernel_size=3, stride=1, padding=1, residual=True)


class Wav2Lip(nn.Module):
    """The Wav2Lip generator: ``(mel, faces) -> faces with the mouth redrawn``.

    ``forward(mel, faces)``: mel ``(B, 1, 80, 16)``, faces ``(B, 6, 96, 96)``
    -> ``(B, 3, 96, 96)`` in [0, 1]. The original's sequence forms are accepted
    too: mel ``(B, T, 1, 80, 16)`` with faces ``(B, 6, T, 96, 96)`` ->
    ``(B, 3, T, 96, 96)``.

    For a still avatar every frame has the same face input, so the face
    encoder need run only once: ``encode_faces(faces)`` returns its seven
    feature maps and ``decode(mel, features)`` runs the audio encoder and the
    decoder for a whole batch of mel windows, broadcasting features computed
    for a single face over the batch. ``decode(mel, encode_faces(faces))``
    equals ``forward(mel, faces)``.
    """

    def __init__(self):
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList([
            nn.Sequential(Conv2d(6, 16, kernel_size=7, stride=1, padding=3)),  # 96x96
            nn.Sequential(Conv2d(16, 32, kernel_size=3, stride=2, padding=1), _res(32), _res(32)),  # 48x48
            nn.Sequential(Conv2d(32, 64, kernel_size=3, stride=2, padding=1), _res(64), _res(64), _res(64)),  # 24x24
            nn.Sequential(Conv2d(64, 128, kernel_size=3, stride=2, padding=1), _res(128), _res(128)),  # 12x12
            nn.Sequential(Conv2d(128, 256, kernel_size=3, stride=2, padding=1), _res(256), _res(256)),  # 6x6
            nn.Sequential(Conv2d(256, 512, kernel_size=3, stride=2, padding=1), _res(512)),  # 3x3
            nn.Sequential(Conv2d(512, 512, kernel_size=3, stride=1, padding=0),  # 1x1
                          Conv2d(512, 512, kernel_size=1, stride=1, padding=0)),
        ])

        self.audio_encoder = nn.Sequential(
            Conv2d(1, 32, kernel_size=3, stride=1, padding=1), _res(32), _res(32),
            Conv2d(32, 64, kernel_size=3, stride=(3, 1), padding=1), _res(64), _res(64),
            Conv2d(64, 128, kernel_size=3, stride=3, padding=1), _res(128), _res(128),
            Conv2d(128, 256, kernel_size=3, stride=(3, 2), padding=1), _res(256),
            Conv2d(256, 512, kernel_size=3, stride=1, padding=0),
            Conv2d(512, 512, kernel_size=1, stride=1, padding=0),
        )

        self.face_decoder_blocks = nn.ModuleList([
            nn.Sequential(Conv2d(512, 512, kernel_size=1, stride=1, padding=0)),  # 1x1
            nn.Sequential(Conv2dTranspose(1024, 512, kernel_size=3, stride=1, padding=0), _res(512)),  # 3x3
            nn.Sequential(Conv2dTranspose(1024, 512, kernel_size=3, stride=2, padding=1, output_padding=1),
                          _res(512), _res(512)),  # 6x6
            nn.Sequential(Conv2dTranspose(768, 384, kernel_size=3, stride=2, padding=1, output_padding=1),
                          _res(384), _res(384)),  # 12x12
            nn.Sequential(Conv2dTranspose(512, 256, kernel_size=3, stride=2, padding=1, output_padding=1),
                          _res(256), _res(256)),  # 24x24
            nn.Sequential(Conv2dTranspose(320, 128, kernel_size=3, stride=2, padding=1, output_padding=1),
                          _res(128), _res(128)),  # 48x48
            nn.Sequential(Conv2dTranspose(160, 64, kernel_size=3, stride=2, padding=1, output_padding=1),
                          _res(64), _res(64)),  # 96x96
        ])

        self.output_block = nn.Sequential(
            Conv2d(80, 32, kernel_size=3, stride=1, padding=1),
            nn.Conv2d(32, 3, kernel_size=1, stride=1, padding=0),
            nn.Sigmoid(),
        )

    # -- pieces ------------------------------------------------------------

    def encode_faces(self, faces: torch.Tensor) -> list[torch.Tensor]:
        """The face encoder's seven stage outputs for ``faces`` ``(F, 6, 96, 96)``.

        Shapes, in order: (F,16,96,96), (F,32,48,48), (F,64,24,24),
        (F,128,12,12), (F,256,6,6), (F,512,3,3), (F,512,1,1).
        """
        feats = []
        x = faces
        for block in self.face_encoder_blocks:
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, mel: torch.Tensor, face_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Generate faces for mel windows ``(B, 1, 80, 16)`` -> ``(B, 3, 96, 96)`` in [0, 1].

        ``face_features`` is ``encode_faces``'s result for either B faces or
        one face; a single face's features are broadcast over the batch
        without copying (the still-avatar case).
        """
        batch = mel.size(0)
        x = self.audio_encoder(mel)  # (B, 512, 1, 1)
        for block, feat in zip(self.face_decoder_blocks, reversed(face_features)):
            x = block(x)
            if feat.size(0) != batch:
                if feat.size(0) != 1:
                    raise ValueError(f"face features are for {feat.size(0)} faces but the batch has "
                                     f"{batch} mel windows")
                feat = feat.expand(batch, -1, -1, -1)
            x = torch.cat((x, feat), dim=1)
        return self.output_block(x)

    # -- the original entry point ------------------------------------------

    def forward(self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor) -> torch.Tensor:
        """``(B,1,80,16), (B,6,96,96) -> (B,3,96,96)``; or the 5-D sequence forms."""
        if face_sequences.dim() > 4:
            batch, steps = audio_sequences.size(0), audio_sequences.size(1)
            audio_sequences = torch.cat([audio_sequences[:, i] for i in range(steps)], dim=0)
            face_sequences = torch.cat([face_sequences[:, :, i] for i in range(face_sequences.size(2))], dim=0)
            out = self.decode(audio_sequences, self.encode_faces(face_sequences))
            return torch.stack(torch.split(out, batch, dim=0), dim=2)  # (B, 3, T, 96, 96)
        return self.decode(audio_sequences, self.encode_faces(face_sequences))


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedCheckpoint:
    """A loaded model and what the checkpoint file is.

    ``model``: ``Wav2Lip`` (eager; every layout whose weights match the spec)
    or a ``torch.jit.ScriptModule`` (a TorchScript export whose weights do not
    map onto the spec but whose ``(mel, faces)`` call works). Eval mode.
    ``info``: ``describe_checkpoint``'s dict for the file.
    """

    model: nn.Module
    info: dict


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _reference_shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the spec, in state-dict order, without building weights."""
    with torch.device("meta"):
        model = Wav2Lip()
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _strip_prefixes(state: dict) -> dict:
    for prefix in _KEY_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _validate_state_dict(state: dict, name: str) -> dict:
    """The state dict as a clean float32/int64 dict of the spec's keys, or CheckpointError."""
    reference = _reference_shapes()
    state = _strip_prefixes(state)
    non_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise CheckpointError(
            f"checkpoint {name}: entry {non_tensor[0]!r} is not a tensor, so this is not a model state dict"
        )
    missing = [k for k in reference if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        sample = ", ".join(sorted(state)[:3]) or "none"
        raise CheckpointError(
            f"checkpoint {name} is not a Wav2Lip generator: {len(missing)} of {len(reference)} weights are missing, "
            f"first missing key {missing[0]!r} (the file has {len(state)} entries, e.g. {sample})"
        )
    unexpected = [k for k in state if k not in reference]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {name} is not a Wav2Lip generator: it has {len(unexpected)} unexpected entries, "
            f"first {unexpected[0]!r}"
        )
    clean = {}
    for key, (shape, dtype) in reference.items():
        if key not in state:  # num_batches_tracked: not used in eval mode
            clean[key] = torch.zeros((), dtype=torch.int64)
            continue
        value = state[key]
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"checkpoint {name} does not match the Wav2Lip architecture: {key!r} has shape "
                f"{list(value.shape)}, expected {list(shape)}"
            )
        if dtype.is_floating_point and not value.dtype.is_floating_point:
            raise CheckpointError(f"checkpoint {name}: {key!r} holds {value.dtype} values, expected floating point")
        clean[key] = value.detach().to(dtype=dtype)
    return clean


def _file_kind(path: str, name: str) -> str:
    """'torchscript', 'zip' (torch.save) or 'legacy' (pre-1.6 torch.save), by content."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"checkpoint {name} is empty")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"checkpoint {name} is a damaged or truncated PyTorch archive ({exc})") from None
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "zip"
        raise CheckpointError(f"checkpoint {name} is a zip file but not a PyTorch checkpoint (no data.pkl inside)")
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save's pre-1.6 format
        return "legacy"
    preview = head.decode("latin-1")
    if head.lstrip()[:1] in (b"{", b"["):
        raise CheckpointError(
            f"checkpoint {name} is not a PyTorch checkpoint: it looks like JSON text (starts with {preview!r})"
        )
    raise CheckpointError(f"checkpoint {name} is not a PyTorch checkpoint (starts with {preview!r})")


def _load_pickled(path: str, name: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
        raise CheckpointError(
            f"checkpoint {name} contains Python objects that cannot be loaded safely ({reason.strip()}); "
            "only tensors, numbers and plain containers are accepted"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {name} could not be read; it is truncated or corrupt "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def _state_from_object(obj: Any, name: str) -> tuple[dict, str]:
    """(state dict, layout) from what torch.load returned."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {name} holds a {type(obj).__name__}, not a model state dict")
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key], "training"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        prefixed = all(isinstance(k, str) and k.startswith(_KEY_PREFIXES) for k in obj)
        return obj, "state_dict_prefixed" if prefixed else "state_dict"
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "nothing"
    raise CheckpointError(
        f"checkpoint {name} is a dict without model weights (it has {keys}; expected 'state_dict' or tensors)"
    )


def _load_torchscript(path: str, name: str) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - TorchScript raises RuntimeError and friends with long C++ traces
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {name} is a TorchScript archive that could not be loaded "
            f"({first[0] if first else type(exc).__name__})"
        ) from None


def _eager_from_state(state: dict) -> Wav2Lip:
    """A ``Wav2Lip`` holding ``state`` (``_validate_state_dict``'s output: every key of the spec).

    Built on the meta device and given the state's tensors (``assign=True``): a random
    initialisation would cost ~0.25 s only to be overwritten, and would draw from torch's global
    RNG. ``strict=True`` and the check below make sure every parameter and buffer (BatchNorm
    statistics included) comes from the checkpoint."""
    with torch.device("meta"):
        model = Wav2Lip()
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # cannot happen with a validated state dict; never hand out a model without weights
        raise CheckpointError(f"checkpoint: {left[0]!r} was not loaded")
    return model.eval()


def _probe(model: nn.Module) -> torch.Tensor:
    """Run one fixed input through ``model`` (CPU, fp32): (1, 3, 96, 96)."""
    gen = torch.Generator().manual_seed(0)
    mel = torch.rand(1, 1, MEL_BINS, MEL_STEPS, generator=gen) * 8 - 4
    faces = torch.rand(1, 6, FACE_SIZE, FACE_SIZE, generator=gen)
    faces[:, :3, FACE_SIZE // 2 :] = 0
    with torch.inference_mode():
        return model(mel, faces)


def _read(path: str | os.PathLike, *, build: bool) -> tuple[nn.Module | None, dict]:
    """Classify and validate ``path``; build the CPU model when ``build``."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    info: dict[str, Any] = {"name": name, "path": os.path.abspath(path), "size_bytes": os.path.getsize(path)}
    kind = _file_kind(path, name)
    if kind == "torchscript":
        scripted = _load_torchscript(path, name)
        info["layout"] = "torchscript"
        try:
            state = _validate_state_dict(dict(scripted.state_dict()), name)
        except CheckpointError as exc:
            # Not our architecture's weights: keep the scripted module if it works.
            info["eager"] = False
            info["parameters"] = sum(p.numel() for p in scripted.parameters())
            if not build:
                return None, info
            scripted.eval()
            try:
                out = _probe(scripted)
            except Exception as run_exc:  # noqa: BLE001 - any failure of a foreign module is a bad checkpoint
                reason = (str(run_exc).strip().splitlines() or [type(run_exc).__name__])[0]
                raise CheckpointError(
                    f"{exc.message}; running it as TorchScript also failed ({reason[:160]})"
                ) from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, 3, FACE_SIZE, FACE_SIZE):
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise CheckpointError(
                    f"{exc.message}; as TorchScript it returns {shape}, not (1, 3, 96, 96) faces") from None
            return scripted, info
        info["eager"] = True
        info["parameters"] = _count(state)
        if not build:
            return None, info
        model = _eager_from_state(state)
        scripted.eval()
        try:
            same = torch.allclose(_probe(model), _probe(scripted), atol=1e-4)
        except Exception:  # noqa: BLE001 - cannot compare: trust the export
            same = False
        if not same:  # same weights, different computation: trust the export
            info["eager"] = False
            return scripted, info
        return model, info
    obj = _load_pickled(path, name)
    state, layout = _state_from_object(obj, name)
    info["layout"] = layout
    state = _validate_state_dict(state, name)
    info["eager"] = True
    info["parameters"] = _count(state)
    return (_eager_from_state(state) if build else None), info


def _count(state: dict) -> int:
    return sum(v.numel() for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a Wav2Lip checkpoint of any layout onto ``device``, in eval mode.

    Layouts (detected by content): a training dict (``state_dict`` with
    ``module.``-prefixed keys plus optimizer state), a bare state dict with or
    without the prefix (zip or pre-1.6 pickle format), or a TorchScript export.
    Pickled files are read with ``torch.load(weights_only=True)``: files that
    would need arbitrary Python objects are refused. A TorchScript export whose
    weights match the spec is loaded into an eager ``Wav2Lip`` (checked to give
    the same output as the export); otherwise the scripted module is used if
    it maps ``(1,1,80,16), (1,6,96,96)`` to ``(1,3,96,96)``.

    Raises ``CheckpointError`` naming the problem (missing file, truncated or
    corrupt archive, not a checkpoint, first missing key, first wrong shape).
    """
    model, info = _read(path, build=True)
    info = dict(info, sha256=_sha256(os.fspath(path))[:16], valid=True, error=None)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"could not move checkpoint {info['name']} to {device}: {exc}") from None
    model.eval()
    return LoadedCheckpoint(model=model, info=info)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """``load_checkpoint(path, device).model``: the generator, eval mode, on ``device``."""
    return load_checkpoint(path, device).model


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What a checkpoint file is, for health pages; never raises for bad files.

    Returns ``{"name", "path", "layout", "parameters", "sha256", "size_bytes",
    "valid", "error"}``: ``layout`` is ``"training"``, ``"state_dict"``,
    ``"state_dict_prefixed"`` or ``"torchscript"`` (None when unreadable),
    ``sha256`` the first 16 hex digits of the file's SHA-256, ``size_bytes``
    its size, ``valid`` whether the weights match the Wav2Lip architecture
    (a TorchScript export with other weights reports valid=True and
    ``eager: False``; only loading runs it), ``error`` the reason when not.
    """
    path = os.fspath(path)
    info: dict[str, Any] = {
        "name": os.path.basename(path),
        "path": os.path.abspath(path),
        "layout": None,
        "parameters": None,
        "sha256": None,
        "size_bytes": os.path.getsize(path) if os.path.isfile(path) else None,
        "valid": False,
        "error": None,
    }
    try:
        info["sha256"] = _sha256(path)[:16] if os.path.isfile(path) else None
        _, read = _read(path, build=False)
        info.update(read, valid=True)
    except CheckpointError as exc:
        info["error"] = exc.message
    except OSError as exc:
        info["error"] = f"checkpoint {info['name']} could not be read: {exc.strerror or exc}"
    return info


# --------------------------------------------------------------------------- random weights


def random_generator(seed: int = 0) -> Wav2Lip:
    """For benchmarks and tests: a generator with random weights, the published architecture's speed.

    Its activations neither vanish nor saturate: BatchNorm running statistics are measured on
    random inputs (mel windows (6, 1, 80, 16) in [-4, 4], faces (6, 6, 96, 96) in [0, 1]), then
    every BatchNorm's weight, bias, mean, variance and batch count is perturbed per channel, so
    a loader that dropped, swapped or misnamed any of them gives other outputs. Seeds torch's
    global RNG with ``seed``; returns the model in eval mode, on the CPU.
    """
    torch.manual_seed(seed)
    model = Wav2Lip()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.rand(6, 1, MEL_BINS, MEL_STEPS) * 8 - 4, torch.rand(6, 6, FACE_SIZE, FACE_SIZE))
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.uniform_(0.6, 1.4)
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.add_(torch.randn_like(bn.running_mean) * 0.1 * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
            bn.num_batches_tracked.fill_(int(torch.randint(1, 10_000, ())))
    return model.eval()


def save_random_checkpoint(path: str | os.PathLike, seed: int = 0, *, model: Wav2Lip | None = None) -> str:
    """For benchmarks and tests: write a random-weights generator to ``path`` as a bare state dict
    (the layout ``load_model`` reads as ``state_dict``); returns ``path`` as a string.

    ``model``: the generator to save, from ``random_generator`` (default: ``random_generator(seed)``),
    for a caller that also runs the same weights directly.
    """
    torch.save((model if model is not None else random_generator(seed)).state_dict(), path)
    return os.fspath(path)


# --------------------------------------------------------------------------- still-avatar fast path


def _fold_batchnorm(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(weight, bias, transposed) of ``block``'s convolution with its eval-mode BatchNorm folded in.

    Folding is done in float64 and the result cast back to float32, so the
    folded layer differs from conv -> BN by float32 rounding only.
    """
    conv, bn = block.conv_block[0], block.conv_block[1]
    transposed = isinstance(conv, nn.ConvTranspose2d)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shape = (1, -1, 1, 1) if transposed else (-1, 1, 1, 1)  # ConvTranspose2d weights are (cin, cout, k, k)
    weight = conv.weight.double() * scale.view(shape)
    bias = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
    return weight.float(), bias.float(), transposed


class _FoldedLayer(nn.Module):
    """One ``Conv2d``/``Conv2dTranspose`` block with BatchNorm folded into the convolution.

    ``split``: the layer's input is ``cat(x, face_feature)`` in the original;
    only the first ``split`` input channels (``x``) are kept here, and the
    face feature's share plus the bias is a per-avatar constant added to the
    output (``StillFaceDecoder.constants``). Convolution is linear, so
    ``conv(cat(x, f)) == conv_x(x) + conv_f(f)``.
    """

    def __init__(self, block: nn.Module, split: int | None = None):
        super().__init__()
        conv = block.conv_block[0]
        weight, bias, self.transposed = _fold_batchnorm(block)
        self.stride, self.padding = conv.stride, conv.padding
        self.output_padding = conv.output_padding if self.transposed else (0, 0)
        self.residual = bool(getattr(block, "residual", False))
        self.split = split
        if split is not None:
            self.register_buffer(
                "weight_face", weight[split:].clone() if self.transposed else weight[:, split:].clone()
            )
            weight = weight[:split] if self.transposed else weight[:, :split]
            self.register_buffer("bias_face", bias)
            bias = None
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.transposed:
            return nn.functional.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding)
        return nn.functional.conv2d(x, weight, bias, self.stride, self.padding)

    def face_constant(self, feature: torch.Tensor) -> torch.Tensor:
        """The face feature's share of this layer's output, plus the bias: (1, cout, H, W)."""
        return self.conv(feature, self.weight_face, self.bias_face)

    def forward(self, x: torch.Tensor, constant: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, self.weight, self.bias)
        if constant is not None:
            out = out + constant
        if self.residual:
            out = out + x
        return torch.relu(out)


def mouth_rows_start(mask_top_zero: float, margin: int = 4) -> int:
    """First row of the 96x96 output that a blend mask starting at ``mask_top_zero`` can show.

    A mask that is 0 above ``mask_top_zero`` of the region's height never
    shows face rows above about ``mask_top_zero * 96``; a bicubic resize
    reads 2 rows on either side, so ``margin`` (4) rows are kept above that.
    """
    return max(0, min(FACE_SIZE - 1, int(mask_top_zero * FACE_SIZE) - margin))


class StillFaceDecoder(nn.Module):
    """Wav2Lip's audio encoder and decoder specialised for one still face.

    Built from a ``Wav2Lip`` (weights are copied, BatchNorm folded into every
    convolution). For a still avatar the face features are the same in every
    frame, so each decoder stage's first convolution is split: the part that
    reads the face features, plus the bias, becomes a per-avatar constant
    (``constants(features)``, computed once per avatar); per frame only the
    audio-dependent part runs and the ``torch.cat`` disappears. About 6% fewer
    operations per frame than ``Wav2Lip.decode``, and no BatchNorm passes.

    ``rows_from``: compute only output rows ``rows_from..95`` (0: all). The
    engine's blend mask shows only the lower face, so the rows above it need
    not be computed: each decoder stage is cropped to the rows that feed
    those outputs (exactly: a crop keeps the rows its outputs depend on),
    which skips about a quarter of the work for ``rows_from`` 40.

    ``forward(mel, *constants)``: mel ``(B, 1, 80, 16)`` and the tensors
    ``constants`` returned -> ``(B, 3, 96 - rows_from, 96)`` in [0, 1],
    equal to ``Wav2Lip.decode(mel, features)[:, :, rows_from:]`` up to float
    rounding.
    """

    def __init__(self, model: Wav2Lip, rows_from: int = 0):
        super().__init__()
        if not isinstance(model, Wav2Lip):
            raise TypeError("StillFaceDecoder needs an eager Wav2Lip model")
        if not 0 <= rows_from < FACE_SIZE:
            raise ValueError(f"rows_from must be in 0..{FACE_SIZE - 1}")
        self.rows_from = int(rows_from)
        self.audio_encoder = nn.ModuleList(_FoldedLayer(b) for b in model.audio_encoder)
        stages = []
        for i, block in enumerate(model.face_decoder_blocks):
            # Stage i > 0 reads cat(previous stage output, face feature): split it.
            split = block[0].conv_block[0].in_channels - _feature_channels(model, i - 1) if i else None
            stages.append(nn.ModuleList([_FoldedLayer(block[0], split)] + [_FoldedLayer(b) for b in block[1:]]))
        self.stages = nn.ModuleList(stages)
        self.head = _FoldedLayer(model.output_block[0], split=64)  # cat(64 decoder ch, 16 face ch)
        final = model.output_block[1]
        self.register_buffer("final_weight", final.weight.detach().clone())
        self.register_buffer("final_bias", final.bias.detach().clone())
        # Row crops: crop[i] is the first input row (at stage i's input
        # resolution) that stage i computes from; head_crop likewise for the
        # head's input (96x96). Worked backwards from the rows wanted.
        self.head_crop = max(0, self.rows_from - 1)  # one 3x3 conv: its first row is wrong, dropped below
        crops = [0] * len(self.stages)
        need = self.head_crop
        for i in range(len(self.stages) - 1, 1, -1):  # stages 2..6 upsample by 2 (k3 s2 p1 op1)
            residuals = len(self.stages[i]) - 1
            crop = max(0, (need - residuals) // 2)
            crops[i] = crop
            need = crop
        self.crops = crops

    # -- per avatar ---------------------------------------------------------

    def constants(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-avatar tensors for ``forward`` from ``Wav2Lip.encode_faces`` of one face.

        Computed on ``features``' device in this module's dtype; cropped to
        the rows ``forward`` computes.
        """
        if any(f.size(0) != 1 for f in features):
            raise ValueError("constants are for one face: features must have batch size 1")
        feats = list(reversed(features))  # stage i > 0 reads feats[i - 1]; the head reads feats[6]
        out = []
        with torch.inference_mode():
            for i, stage in enumerate(self.stages):
                if i == 0:
                    continue
                c = stage[0].face_constant(feats[i - 1].to(stage[0].weight.dtype))
                out.append(c[:, :, 2 * self.crops[i] :] if i >= 2 else c)
            c = self.head.face_constant(feats[6].to(self.head.weight.dtype))
            out.append(c[:, :, self.head_crop :])
        return [t.contiguous() for t in out]

    # -- per frame ----------------------------------------------------------

    def forward(self, mel: torch.Tensor, *constants: torch.Tensor) -> torch.Tensor:
        x = mel
        for layer in self.audio_encoder:
            x = layer(x)
        for i, stage in enumerate(self.stages):
            if i >= 2 and self.crops[i]:
                x = _crop_rows(x, self.crops[i] - (2 * self.crops[i - 1] if i >= 3 else 0))
            x = stage[0](x, constants[i - 1] if i else None)
            for layer in stage[1:]:
                x = layer(x)
        last = self.crops[-1] * 2
        if self.head_crop > last:
            x = _crop_rows(x, self.head_crop - last)
        x = self.head(x, constants[-1])
        if self.rows_from > self.head_crop:
            x = x[:, :, self.rows_from - self.head_crop :]
        x = nn.functional.conv2d(x, self.final_weight, self.final_bias)
        return torch.sigmoid(x)


def _crop_rows(x: torch.Tensor, start: int) -> torch.Tensor:
    """``x[:, :, start:]`` made dense again in ``x``'s memory format (convolutions want dense input)."""
    fmt = (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and x.size(1) > 1
        else torch.contiguous_format
    )
    return x[:, :, start:].contiguous(memory_format=fmt)


def _feature_channels(model: Wav2Lip, stage: int) -> int:
    """Channels of the face feature concatenated after decoder stage ``stage``."""
    block = model.face_encoder_blocks[len(model.face_encoder_blocks) - 1 - stage]
    return block[-1].conv_block[0].out_channels
