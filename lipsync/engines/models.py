"""Every lip-sync model the service offers, loaded once, chosen per request by name.

``builtin`` (the built-in engine, no weights) is always there. Every Wav2Lip checkpoint in
``CHECKPOINTS_DIR`` is a model named by its file stem (``Wav2Lip-SD-GAN.pt`` ->
``Wav2Lip-SD-GAN``), and so is ``CHECKPOINT_PATH`` when it lies elsewhere. Files are told
apart by content (``describe_checkpoint``), never by name or extension: face-detector weights
(``s3fd.pth``) or a half-copied file are not models (the latter is logged). An optional
``<name>.json`` beside a checkpoint (``{"description": "..."}``) gives the one line pickers
show.

The default model: ``DEFAULT_MODEL`` by name; else ``CHECKPOINT_PATH``'s when that file
exists; else the first checkpoint found (by name); else ``builtin``. ``ENGINE=builtin``
loads no checkpoint at all (``builtin`` is then the only model); ``ENGINE=wav2lip`` needs at
least one.

Every model is built once and shared by all requests; each Wav2Lip engine runs its device
calls on its own thread, one at a time, so two models may run at once, each still serialised.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from lipsync.engines.base import Engine
from lipsync.errors import CheckpointError, InvalidInputError
from lipsync.memory import release_memory
from lipsync.settings import Settings

log = logging.getLogger("lipsync")

BUILTIN = "builtin"
NOT_CHECKPOINTS = (".json", ".md", ".txt", ".yaml", ".yml", ".sha256", ".part", ".tmp")
MAX_DESCRIPTION_CHARS = 200
WEIGHT_BYTES = {"fp16": 2, "int8": 1}  # bytes a weight takes by engine precision (else fp32: 4)


@dataclass(frozen=True)
class Model:
    """One loaded model: its ``engine`` and what ``GET /api/models`` says of it."""

    name: str
    engine: Engine
    checkpoint: str | None = None    # the file's path (None for builtin)
    layout: str | None = None        # load_checkpoint's layout: training, state_dict, ..., torchscript
    params: int = 0                  # learnable parameters (0 for builtin)
    description: str | None = None
    memory_bytes: int = 0            # what loading it cost (process RSS, plus GPU memory on CUDA)

    def public(self, default: str) -> dict:
        info = self.engine.describe()
        return {"name": self.name, "engine": self.engine.name,
                "checkpoint": os.path.basename(self.checkpoint) if self.checkpoint else None,
                "layout": self.layout, "params": self.params, "device": info.get("device"),
                "precision": info.get("precision", "fp32"), "default": self.name == default,
                "description": self.description, "memory_mb": round(self.memory_bytes / 2**20, 1)}


class ModelSet:
    """The loaded models by name, and which one a request without ``model`` gets."""

    def __init__(self, models: list[Model], default: str):
        self.models = {m.name: m for m in models}
        if default not in self.models:
            raise CheckpointError(f"DEFAULT_MODEL={default!r} is not a model here; the models are "
                                  f"{', '.join(self.models)}")
        self.default = default

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str | None, preferred: str | None = None) -> str:
        """The model a request gets: ``name`` when given (400 ``unknown_model`` listing the known
        ones if it is not one), else ``preferred`` (an avatar's) when it is still there, else the
        default."""
        if name is None:
            return preferred if preferred in self.models else self.default
        if not isinstance(name, str) or name not in self.models:
            raise InvalidInputError(f"unknown model {str(name)[:80]!r}; the models are {', '.join(self.models)}",
                                    code="unknown_model")
        return name

    def engine(self, name: str | None = None) -> Engine:
        return self.models[name or self.default].engine

    def public(self) -> list[dict]:
        return [m.public(self.default) for m in self.models.values()]


def find_checkpoints(settings: Settings) -> dict[str, str]:
    """{model name: path} of every Wav2Lip checkpoint in ``checkpoint_dir`` and ``checkpoint_path``,
    by name; a name found twice (the same stem in two places) keeps the first, with a warning."""
    candidates = []
    if os.path.isdir(settings.checkpoint_dir):
        for entry in sorted(os.scandir(settings.checkpoint_dir), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith(".") and not entry.name.lower().endswith(NOT_CHECKPOINTS):
                candidates.append(entry.path)
    if os.path.isfile(settings.checkpoint_path):
        candidates.append(settings.checkpoint_path)
    found: dict[str, str] = {}
    if not candidates:
        return found  # no torch import (~200 MB) where there is nothing to look at
    from lipsync.engines.wav2lip.model import describe_checkpoint

    seen: set[str] = set()
    for path in candidates:
        real = os.path.realpath(path)
        if real in seen or real == os.path.realpath(settings.s3fd_path):
            continue
        seen.add(real)
        info = describe_checkpoint(path)
        if not info["valid"]:
            if real == os.path.realpath(settings.checkpoint_path):  # the file named as the checkpoint: say why
                raise CheckpointError(info["error"] or f"{path} is not a Wav2Lip checkpoint")
            log.info("%s is not a Wav2Lip checkpoint (%s); not offered as a model", path, info["error"])
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        if name == BUILTIN or name in found:
            log.warning("two checkpoints are named %r (%s, %s): only the first is a model", name, found.get(name), path)
            continue
        found[name] = path
    return found


def default_model_name(settings: Settings, checkpoints: dict[str, str]) -> str:
    """The default model's name under the rules in the module doc."""
    if settings.default_model:
        return settings.default_model
    if os.path.isfile(settings.checkpoint_path):
        real = os.path.realpath(settings.checkpoint_path)
        for name, path in checkpoints.items():
            if os.path.realpath(path) == real:
                return name
    return next(iter(checkpoints), BUILTIN)


def description(path: str | None) -> str | None:
    """The one line from ``<stem>.json`` beside a checkpoint, if there is one."""
    if path is None:
        return None
    try:
        with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
            text = json.load(f).get("description")
    except (OSError, ValueError, AttributeError):
        return None
    return " ".join(text.split())[:MAX_DESCRIPTION_CHARS] if isinstance(text, str) else None


def load_models(settings: Settings, build_wav2lip=None) -> ModelSet:
    """Build every model once (see the module doc). ``build_wav2lip(settings, path) -> Engine``
    builds one Wav2Lip engine (the service's ``create_wav2lip``). Raises ``CheckpointError``
    (``ENGINE=wav2lip`` without a checkpoint, an unknown ``DEFAULT_MODEL``, a checkpoint that
    cannot be loaded)."""
    from lipsync.devices import cuda_device
    from lipsync.engines.builtin.engine import BuiltinEngine

    checkpoints = {} if settings.engine == "builtin" else find_checkpoints(settings)
    if settings.engine == "wav2lip" and not checkpoints:
        raise CheckpointError(f"ENGINE=wav2lip but no checkpoint at {settings.checkpoint_path} "
                              f"and no Wav2Lip checkpoint in {settings.checkpoint_dir}/")
    default = default_model_name(settings, checkpoints)
    models = []
    for name, path in checkpoints.items():
        from lipsync.engines.wav2lip.model import describe_checkpoint

        before = _memory_in_use()
        engine = build_wav2lip(settings, path)
        grown = _memory_in_use() - before
        info = describe_checkpoint(path)
        params = int(info["parameters"] or 0)
        # At least its weights, in the precision it runs: the resident memory can miss them when
        # other threads free memory while it loads (a server's renders, a test suite's).
        weights = params * WEIGHT_BYTES.get(engine.describe().get("precision"), 4)
        model = Model(name=name, engine=engine, checkpoint=path, layout=info["layout"], params=params,
                      description=description(path), memory_bytes=max(grown, weights))
        log.info("model %s loaded from %s (%s, %.0f MB)", name, path, model.layout, model.memory_bytes / 2**20)
        models.append(model)
    # Its mouth states are drawn on the GPU the service makes its frames on, when there is one.
    builtin = BuiltinEngine(device=cuda_device(settings.device))
    models.append(Model(name=BUILTIN, engine=builtin, description="The built-in engine: no weights, "
                        "animates the photo's own lips (fast on a CPU)."))
    return ModelSet(models, default)


def _memory_in_use() -> int:
    """This process's resident memory plus what PyTorch holds on CUDA devices, in bytes. Memory
    freed earlier (a previous model's, a request's) is given back to the OS first: otherwise a
    model loaded into those still-resident pages would seem to cost nothing."""
    release_memory(wait=True)
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            rss += sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - memory accounting must never stop loading
        pass
    return rss
