"""Which engine the service runs: Wav2Lip as soon as a checkpoint exists, the built-in one otherwise."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lipsync.engines.wav2lip.model import Wav2Lip
from lipsync.server import close_app, create_app
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from tests.media import probe


@pytest.fixture(scope="module")
def generator_weights(tmp_path_factory) -> str:
    """A state dict with random weights (the published layout's keys and shapes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "weights.pth"
    torch.save(Wav2Lip().state_dict(), path)
    return str(path)


def _install(weights: str, dest) -> None:
    """Put the module's checkpoint at ``dest``: a hard link to the one written file (the service
    only reads checkpoints), so no test writes another 145 MB; a copy where links are refused."""
    try:
        os.link(weights, dest)
    except OSError:
        shutil.copyfile(weights, dest)


def _settings(tmp_path, **overrides) -> Settings:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    base = dict(output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                checkpoint_dir=str(checkpoints), checkpoint_path=str(checkpoints / "Wav2Lip-SD-GAN.pt"),
                s3fd_path=str(checkpoints / "s3fd.pth"))
    base.update(overrides)
    return Settings(**base)


def test_without_a_checkpoint_the_builtin_engine_runs(tmp_path):
    service = LipsyncService(_settings(tmp_path)).load()
    assert service.status == "ready" and service.describe()["engine"] == "builtin"


def test_a_checkpoint_at_CHECKPOINT_PATH_switches_to_wav2lip(tmp_path, generator_weights):
    settings = _settings(tmp_path)
    _install(generator_weights, tmp_path / "checkpoints" / "Wav2Lip-SD-GAN.pt")
    info = LipsyncService(settings).load().describe()
    assert info["status"] == "ready", info.get("error")
    assert info["engine"] == "wav2lip" and info["checkpoint"] == "Wav2Lip-SD-GAN.pt"
    assert info["version"] and info["device"] == "cpu"


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_any_checkpoint_in_the_folder_is_found_but_not_s3fd_weights(tmp_path, generator_weights):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "s3fd.pth").write_bytes(b"face detector weights, not a generator")
    service = LipsyncService(_settings(tmp_path, face_detector="haar")).load()
    assert service.describe()["engine"] == "builtin"
    _install(generator_weights, folder / "wav2lip_gan.pth")
    info = LipsyncService(_settings(tmp_path, face_detector="haar")).load().describe()
    assert info["engine"] == "wav2lip" and info["checkpoint"] == "wav2lip_gan.pth"


def test_engine_settings_reach_the_engine(tmp_path, generator_weights):
    (tmp_path / "checkpoints").mkdir()
    _install(generator_weights, tmp_path / "checkpoints" / "w.pth")
    info = LipsyncService(_settings(tmp_path, wav2lip_backend="torch", wav2lip_precision="fp32",
                                    wav2lip_mouth_only=False)).load().describe()
    assert info["engine"] == "wav2lip"
    assert (info["backend"], info["precision"], info["mouth_only"]) == ("torch", "fp32", False)


def test_forcing_wav2lip_without_a_checkpoint_reports_why(tmp_path):
    service = LipsyncService(_settings(tmp_path, engine="wav2lip")).load()
    assert service.status == "error"
    assert "no checkpoint" in service.error and "Wav2Lip-SD-GAN.pt" in service.error


def test_a_damaged_checkpoint_is_an_error_in_health_not_a_crash(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "Wav2Lip-SD-GAN.pt").write_bytes(b"PK\x03\x04 truncated download")
    app = create_app({"SETTINGS": _settings(tmp_path), "LOAD_IN_BACKGROUND": False})
    r = app.test_client().get("/api/health")
    assert r.status_code == 503 and r.get_json()["status"] == "error"
    assert "Wav2Lip-SD-GAN.pt" in r.get_json()["error"]
    close_app(app)


def test_builtin_can_be_forced_while_a_checkpoint_exists(tmp_path, generator_weights):
    (tmp_path / "checkpoints").mkdir()
    _install(generator_weights, tmp_path / "checkpoints" / "w.pth")
    assert LipsyncService(_settings(tmp_path, engine="builtin")).load().describe()["engine"] == "builtin"


@pytest.mark.slow
def test_a_request_with_the_wav2lip_engine_gives_a_video_as_long_as_the_speech(tmp_path, generator_weights,
                                                                               avatar_path, speech_wav_path):
    (tmp_path / "checkpoints").mkdir()
    _install(generator_weights, tmp_path / "checkpoints" / "w.pth")
    service = LipsyncService(_settings(tmp_path, avatar_path=str(avatar_path))).load()
    assert service.describe()["engine"] == "wav2lip", service.error
    out = tmp_path / "w.mp4"
    result = service.generate(str(out), recording=speech_wav_path.read_bytes())
    info = probe(out)
    assert result.engine == "w" and info["frames"] == result.frames == 176  # the model: the checkpoint's stem
    assert (info["width"], info["height"]) == (626, 720)
    assert abs(info["video_duration"] - info["audio_duration"]) <= 0.04 + 0.03
