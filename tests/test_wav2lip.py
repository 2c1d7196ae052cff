"""The Wav2Lip generator and its checkpoint loader.

A random-weights generator (BatchNorm running statistics randomised too) is
saved in every layout users have; each must load back to the same function.
Broken files must fail with a ``CheckpointError`` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lipsync.engines.wav2lip.model import (
    PARAMETER_COUNT,
    Wav2Lip,
    describe_checkpoint,
    load_checkpoint,
    load_model,
    random_generator,
)
from lipsync.errors import CheckpointError
from tests.conftest import skip_or_fail

SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "wav2lip_state_dict.json"


pytestmark = pytest.mark.usefixtures("torch_threads")


def model_inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel windows (B,1,80,16) in [-4, 4] and faces (B,6,96,96) with the lower half of 0-2 zeroed."""
    gen = torch.Generator().manual_seed(seed)
    mel = torch.rand(batch, 1, 80, 16, generator=gen) * 8 - 4
    faces = torch.rand(batch, 6, 96, 96, generator=gen)
    faces[:, :3, 48:] = 0
    return mel, faces


def run(model: nn.Module, mel: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(mel, faces)


class _Wrapped(nn.Module):
    """A generator inside another module: its keys ('net.*') do not match the spec."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, mel, faces):
        return self.net(mel, faces)


def _trace(module: nn.Module, inputs) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, inputs, check_trace=False)


@pytest.fixture(scope="module")
def source() -> Wav2Lip:
    return random_generator(0)


@pytest.fixture(scope="module")
def inputs():
    return model_inputs()


@pytest.fixture(scope="module")
def expected(source, inputs) -> torch.Tensor:
    out = run(source, *inputs)
    # The test model is informative: outputs spread over [0, 1] and depend on the input.
    assert out.std() > 0.1 and (out[0] - out[1]).abs().max() > 0.3
    return out


@pytest.fixture(scope="module")
def checkpoints(source, inputs, tmp_path_factory) -> dict[str, Path]:
    """The same weights in every layout; file names deliberately say nothing true about the layout."""
    folder = tmp_path_factory.mktemp("wav2lip_ckpt")
    state = source.state_dict()
    prefixed = {"module." + k: v for k, v in state.items()}
    params = list(source.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4).state_dict()
    optimizer["state"] = {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(params[i]),
                              "exp_avg_sq": torch.zeros_like(params[i])} for i in range(3)}
    paths = {name: folder / fname for name, fname in {
        "training": "wav2lip_gan.pt", "training_zip": "checkpoint_step000123.pth", "bare_prefixed": "weights.pth",
        "bare": "generator.ckpt", "torchscript": "Wav2Lip-SD-GAN.pth",
    }.items()}
    training = {"state_dict": prefixed, "optimizer": optimizer, "global_step": 123000, "global_epoch": 42}
    # The published wav2lip_gan.pth predates torch 1.6: the legacy (non-zip) format.
    torch.save(training, paths["training"], _use_new_zipfile_serialization=False)
    torch.save(training, paths["training_zip"])
    torch.save(prefixed, paths["bare_prefixed"])
    torch.save(state, paths["bare"])
    _trace(source, inputs).save(str(paths["torchscript"]))
    return paths


@pytest.fixture(scope="module")
def torchscript_other(source, inputs, tmp_path_factory) -> Path:
    """The same weights traced inside another module (keys 'net.*'): only the slow test needs it."""
    path = tmp_path_factory.mktemp("wav2lip_ckpt_other") / "exported.pt"
    _trace(_Wrapped(source), inputs).save(str(path))
    return path


# ---------------------------------------------------------------- architecture


def test_state_dict_matches_the_published_layout_exactly():
    if not SPEC.exists():
        skip_or_fail(f"spec {SPEC} not found")
    spec = json.loads(SPEC.read_text())
    with torch.device("meta"):
        model = Wav2Lip()
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert len(ours) == len(spec) == 352
    for mine, theirs in zip(ours, spec):  # first difference, readably
        assert mine == theirs
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNT == 36_298_035


def test_forward_shapes_and_range(source, inputs, expected):
    mel, faces = inputs
    assert expected.shape == (3, 3, 96, 96) and expected.dtype == torch.float32
    assert expected.min() >= 0 and expected.max() <= 1
    # The original's sequence form: (B,T,1,80,16), (B,6,T,96,96) -> (B,3,T,96,96), frame by frame the same.
    mel5 = torch.stack([mel[:1], mel[1:2]], dim=1)            # B=1, T=2
    faces5 = torch.stack([faces[:1], faces[1:2]], dim=2)
    out5 = run(source, mel5, faces5)
    assert out5.shape == (1, 3, 2, 96, 96)
    torch.testing.assert_close(out5[:, :, 0], expected[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out5[:, :, 1], expected[1:2], atol=1e-5, rtol=0)


def test_face_features_computed_once_give_the_same_frames(source, inputs):
    mel, faces = inputs
    still = faces[:1].expand(3, -1, -1, -1).contiguous()     # a still avatar: one face for every frame
    plain = run(source, mel, still)
    with torch.inference_mode():
        features = source.encode_faces(faces[:1])
        assert [tuple(f.shape) for f in features] == [(1, 16, 96, 96), (1, 32, 48, 48), (1, 64, 24, 24),
                                                      (1, 128, 12, 12), (1, 256, 6, 6), (1, 512, 3, 3), (1, 512, 1, 1)]
        reused = source.decode(mel, features)
        per_face = source.decode(mel, source.encode_faces(faces))
    # Encoding 1 face instead of 3 picks other conv kernels, so float rounding
    # differs (~1e-5 after 30 layers); 1e-4 is still 40x below one 8-bit level.
    torch.testing.assert_close(reused, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(per_face, run(source, mel, faces), atol=1e-5, rtol=0)
    assert ((reused * 255).round() != (plain * 255).round()).float().mean() < 1e-3
    assert (plain[0] - plain[1]).abs().max() > 0.1  # frames still follow the audio


# ---------------------------------------------------------------- loading every layout

EAGER_LAYOUTS = {"training": "training", "training_zip": "training", "bare_prefixed": "state_dict_prefixed",
                 "bare": "state_dict", "torchscript": "torchscript"}


@pytest.mark.parametrize("name", list(EAGER_LAYOUTS))
def test_every_layout_loads_to_the_same_generator(name, checkpoints, inputs, expected):
    loaded = load_checkpoint(checkpoints[name])
    # TorchScript weights go into our own module too: face-feature reuse and fp16 work for every layout.
    assert type(loaded.model) is Wav2Lip and not loaded.model.training
    torch.testing.assert_close(run(loaded.model, *inputs), expected, atol=1e-5, rtol=0)
    assert loaded.info["layout"] == EAGER_LAYOUTS[name]
    assert loaded.info["parameters"] == PARAMETER_COUNT


@pytest.mark.slow  # one more trace and load of a 145 MB model
def test_torchscript_with_other_weights_runs_as_scripted_module(torchscript_other, inputs, expected):
    model = load_model(torchscript_other)
    assert isinstance(model, torch.jit.ScriptModule)
    torch.testing.assert_close(run(model, *inputs), expected, atol=1e-5, rtol=0)


def test_describe_checkpoint_reports_what_the_file_is(checkpoints):
    path = checkpoints["training"]
    info = describe_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["name"] == "wav2lip_gan.pt" and info["layout"] == "training" and info["valid"] is True
    assert info["parameters"] == PARAMETER_COUNT and info["error"] is None
    assert info["size_bytes"] == path.stat().st_size > 140_000_000
    assert len(info["sha256"]) >= 8 and digest.startswith(info["sha256"])
    assert describe_checkpoint(checkpoints["torchscript"])["layout"] == "torchscript"
    assert describe_checkpoint(checkpoints["bare"])["layout"] == "state_dict"


# ---------------------------------------------------------------- broken files


def _message(path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    message = info.value.message
    assert "Traceback" not in message and len(message) < 400
    return message


@pytest.mark.parametrize("name", ["training", "training_zip", "torchscript"])
def test_truncated_file_is_reported(name, checkpoints, tmp_path):
    data = checkpoints[name].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    _message(cut, "truncated|damaged|corrupt")
    assert describe_checkpoint(cut)["valid"] is False


def test_wrong_shape_names_the_tensor(source, tmp_path):
    state = dict(source.state_dict())
    key = "face_decoder_blocks.3.0.conv_block.0.weight"
    state[key] = torch.zeros(768, 384, 3, 2)
    torch.save(state, tmp_path / "bad.pth")
    message = _message(tmp_path / "bad.pth", "shape")
    assert key in message and "[768, 384, 3, 2]" in message and "[768, 384, 3, 3]" in message


def test_missing_key_is_named(source, tmp_path):
    state = {"module." + k: v for k, v in source.state_dict().items() if not k.startswith("output_block.1.")}
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "partial.pth")
    assert "'output_block.1.weight'" in _message(tmp_path / "partial.pth", "missing")


def test_other_models_weights_are_refused(tmp_path):
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "linear.pth")
    _message(tmp_path / "linear.pth", "not a Wav2Lip generator")
    _trace(nn.Linear(4, 2), (torch.zeros(1, 4),)).save(str(tmp_path / "linear_ts.pt"))
    _message(tmp_path / "linear_ts.pt", "TorchScript")


def test_json_renamed_pth_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "wav2lip_gan.pth"
    path.write_text(json.dumps([["face_encoder_blocks.0.0.conv_block.0.weight", [16, 6, 7, 7], "float32"]]))
    _message(path, "not a PyTorch checkpoint.*JSON")
    info = describe_checkpoint(path)
    assert info["valid"] is False and "JSON" in info["error"]


def test_empty_missing_and_non_dict_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    _message(tmp_path / "empty.pth", "empty")
    _message(tmp_path / "nope.pth", "not found")
    assert describe_checkpoint(tmp_path / "nope.pth")["error"].endswith("not found")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    _message(tmp_path / "list.pth", "not a model state dict")
    torch.save({"epoch": 3}, tmp_path / "dict.pth")
    _message(tmp_path / "dict.pth", "without model weights")


class _Payload:
    """Unpickling this would create a file: proof that loading ran foreign code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Payload(marker)}, f, protocol=2)  # legacy-looking pickle
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(CheckpointError):
            load_model(tmp_path / name)
    assert not marker.exists()
