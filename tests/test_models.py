"""Several lip-sync models side by side (issue 16): every checkpoint in CHECKPOINTS_DIR is a model.

Two random-weights Wav2Lip checkpoints of different layouts (a bare state dict and a training
checkpoint with ``module.`` keys and optimizer state) lie in a temporary checkpoints folder with
face-detector weights and a truncated file that are not models. A real app serves them; its
MP4s are decoded and compared with those of a service that loaded one checkpoint alone.
"""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch

from lipsync.engines.wav2lip.model import random_generator
from lipsync.media.audio import load_audio, write_wav
from lipsync.server import close_app
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from tests.apps import make_app, no_model_settings, split_settings
from tests.conftest import fixture_path
from tests.media import decoded_frames

PARAMS = 36_298_035


def _settings(root, checkpoints, **more) -> dict:
    return no_model_settings(root, **{"engine": "auto", "batch_size": 16, "checkpoint_dir": str(checkpoints),
                                      "idle_motion": False, **more})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints/: gan.pth (bare state dict, seed 1, with gan.json), nogan.pt (training layout,
    seed 2), s3fd.pth (face-detector-like weights) and broken.pth (a truncated copy)."""
    folder = tmp_path_factory.mktemp("models") / "checkpoints"
    folder.mkdir()
    torch.save(random_generator(1).state_dict(), folder / "gan.pth")
    (folder / "gan.json").write_text(json.dumps({"description": "Sharper,   shows teeth."}))
    state = {f"module.{k}": v for k, v in random_generator(2).state_dict().items()}
    torch.save({"state_dict": state, "optimizer": {"state": {}, "param_groups": []}, "global_step": 7},
               folder / "nogan.pt")
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3), "conv1_1.bias": torch.zeros(64)}, folder / "s3fd.pth")
    (folder / "broken.pth").write_bytes((folder / "gan.pth").read_bytes()[:100_000])
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("models_app")


@pytest.fixture(scope="module")
def app(root, checkpoints):
    app = make_app(**_settings(root, checkpoints))
    yield app
    close_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> bytes:
    """0.6 s of the Kennedy recording's speech, as WAV bytes."""
    samples = load_audio(str(fixture_path("kennedy_speech_16k.wav")))[int(2.0 * 16000):int(2.6 * 16000)]
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    write_wav(str(path), samples)
    return path.read_bytes()


def _frames(data: bytes, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data)
    return np.stack(list(decoded_frames(path)))


def _generate(client, speech: bytes, **fields):
    return client.post("/api/generate", data={"audio": (io.BytesIO(speech), "s.wav"), **fields},
                       content_type="multipart/form-data")


def test_every_checkpoint_is_a_model_and_builtin_is_always_there(client):
    models = client.get("/api/models").get_json()
    assert [m["name"] for m in models] == ["gan", "nogan", "builtin"]  # s3fd.pth and broken.pth are not models
    gan, nogan, builtin = models
    assert gan["default"] and not nogan["default"] and not builtin["default"]  # the first by name
    assert (gan["engine"], gan["checkpoint"], gan["layout"], gan["params"]) == ("wav2lip", "gan.pth", "state_dict",
                                                                                PARAMS)
    assert (nogan["checkpoint"], nogan["layout"], nogan["params"]) == ("nogan.pt", "training", PARAMS)
    assert gan["description"] == "Sharper, shows teeth." and nogan["description"] is None
    assert builtin["engine"] == "builtin" and builtin["checkpoint"] is None and builtin["params"] == 0
    assert all(m["device"] == "cpu" and m["precision"] == "fp32" for m in models)
    # What each model cost to load, measured: the weights alone are 145 MB in fp32.
    assert gan["memory_mb"] > 100 and nogan["memory_mb"] > 100
    health = client.get("/api/health").get_json()
    assert health["models"] == ["gan", "nogan", "builtin"] and health["model"] == "gan"


def test_a_model_loaded_after_others_were_freed_still_reports_what_it_holds(root, checkpoints):
    """A process that loads models again (a reload, a second app) reuses the freed pages: the
    memory a model holds must still be counted, not read as 0 MB from an unchanged RSS."""
    import gc

    from lipsync.engines.models import load_models
    from lipsync.service import create_wav2lip

    settings, _ = split_settings(**_settings(root, checkpoints))
    for _ in range(2):
        models = load_models(settings, create_wav2lip)
        sizes = {m["name"]: m["memory_mb"] for m in (model.public(models.default) for model in models.models.values())}
        assert sizes["gan"] > 100 and sizes["nogan"] > 100, sizes
        del models
        gc.collect()


def test_each_model_chosen_by_name_gives_its_own_frames_the_same_as_alone(client, speech, root, checkpoints,
                                                                           tmp_path):
    by_name = {}
    for name in ("gan", "nogan", "builtin"):
        r = _generate(client, speech, model=name)
        assert r.status_code == 200, r.get_json()
        assert r.headers["X-Engine"] == name
        by_name[name] = _frames(r.data, tmp_path, f"{name}.mp4")
    assert by_name["gan"].shape == by_name["nogan"].shape
    assert np.abs(by_name["gan"].astype(int) - by_name["nogan"]).mean() > 1.0  # two different models
    # The default model is gan: no model named gives its frames.
    default = _generate(client, speech)
    assert default.headers["X-Engine"] == "gan"
    assert np.array_equal(_frames(default.data, tmp_path, "default.mp4"), by_name["gan"])
    # nogan loaded alone (its file as CHECKPOINT_PATH, no folder) gives exactly the same video.
    alone = LipsyncService(_alone_settings(root, checkpoints, tmp_path)).load()
    assert alone.status == "ready", alone.error
    assert alone.models.names == ["nogan", "builtin"] and alone.models.default == "nogan"
    result = alone.generate(str(tmp_path / "alone.mp4"), recording=speech)
    assert result.engine == "nogan"
    assert np.array_equal(np.stack(list(decoded_frames(tmp_path / "alone.mp4"))), by_name["nogan"])


def _alone_settings(root, checkpoints, tmp_path) -> Settings:
    values = _settings(root, tmp_path / "no-such-folder", checkpoint_path=str(checkpoints / "nogan.pt"),
                       output_dir=str(tmp_path / "alone"))
    for server_only in ("rate_limit", "rate_limit_read"):
        values.pop(server_only)
    return Settings(**values)


def test_an_unknown_model_is_a_400_listing_the_known_ones(client, speech):
    for r in (_generate(client, speech, model="gan2"),
              client.post("/api/generate", json={"text": "Hi.", "language": "en", "model": "Gan"}),
              client.post("/api/jobs", json={"text": "Hi.", "language": "en", "model": "nope"}),
              client.post("/api/avatars", data={"avatar": (io.BytesIO(fixture_path("kennedy_low.jpg").read_bytes()),
                                                           "k.jpg"), "model": "nope"},
                          content_type="multipart/form-data")):
        assert r.status_code == 400, r.get_json()
        body = r.get_json()
        assert body["code"] == "unknown_model" and "gan, nogan, builtin" in body["error"]
    r = client.post("/api/generate", json={"text": "Hi.", "language": "en", "model": 7})
    assert r.status_code == 400 and r.get_json()["code"] == "unknown_model"


def test_an_avatar_carries_its_preferred_model(client):
    r = client.post("/api/avatars", data={"avatar": (io.BytesIO(fixture_path("kennedy_low.jpg").read_bytes()),
                                                     "k.jpg"), "model": "builtin"},
                    content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    entry = r.get_json()
    assert entry["model"] == "builtin"
    on_it = client.post("/api/generate", json={"text": "Hello.", "language": "en", "avatar_id": entry["id"]})
    assert on_it.status_code == 200 and on_it.headers["X-Engine"] == "builtin"
    chosen = client.post("/api/generate", json={"text": "Hello.", "language": "en", "avatar_id": entry["id"],
                                                "model": "nogan"})
    assert chosen.status_code == 200 and chosen.headers["X-Engine"] == "nogan"  # the request's choice wins
    client.delete(entry["url"])


def test_the_default_rules(root, checkpoints, tmp_path):
    def load(**more) -> LipsyncService:
        values = _settings(root, checkpoints, output_dir=str(tmp_path / "out"), **more)
        values.pop("rate_limit"), values.pop("rate_limit_read")
        return LipsyncService(Settings(**values)).load()

    assert load(default_model="nogan").models.default == "nogan"
    assert load(default_model="builtin").models.default == "builtin"
    assert load(checkpoint_path=str(checkpoints / "nogan.pt")).models.default == "nogan"  # CHECKPOINT_PATH
    only_builtin = load(engine="builtin")
    assert only_builtin.models.names == ["builtin"] and only_builtin.models.default == "builtin"
    wrong = load(default_model="gan3")
    assert wrong.status == "error" and "DEFAULT_MODEL='gan3'" in wrong.error and "gan, nogan, builtin" in wrong.error
    again = load()  # a restart finds the same models
    assert again.models.names == ["gan", "nogan", "builtin"] and again.models.default == "gan"
    # CHECKPOINTS_DIR from the environment (CHECKPOINT_DIR, its old name, still works).
    assert Settings.from_env({"CHECKPOINTS_DIR": "/m"}).checkpoint_dir == "/m"
    assert Settings.from_env({"CHECKPOINT_DIR": "/old"}).checkpoint_dir == "/old"


@pytest.mark.slow
def test_concurrent_requests_on_different_models_never_mix_frames(client, speech, tmp_path):
    serial = {name: _frames(_generate(client, speech, model=name).data, tmp_path, f"serial-{name}.mp4")
              for name in ("gan", "nogan")}
    results: dict[int, tuple[str, bytes]] = {}

    def one(i: int, name: str) -> None:
        r = _generate(client, speech, model=name)
        results[i] = (name, r.data if r.status_code == 200 else b"")

    threads = [threading.Thread(target=one, args=(i, name)) for i, name in enumerate(["gan", "nogan"] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4
    for i, (name, data) in results.items():
        assert data, name
        assert np.array_equal(_frames(data, tmp_path, f"concurrent-{i}.mp4"), serial[name]), name
