"""Face location: Haar fallback on real fixtures, caches, override, S3FD network.

The Haar tests run the real OpenCV cascades on the shared fixture photos and
compare with the boxes in ../shared/fixtures/README.md. S3FD cannot be judged
on detections without the user's weights file; we test that the published
layouts load strictly, that broken files are refused, the decoder and NMS on
hand-built output maps, and the whole pipeline on a network with hand-set
weights. When real weights are present (S3FD_PATH or checkpoints/s3fd.pth)
an extra slow test checks real detections on the fixtures.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lipsync.errors import CheckpointError, InvalidInputError, NoFaceError
from lipsync.faces import FaceBox, FaceLocator, s3fd
from lipsync.faces import NoFaceError as ExportedNoFaceError
from lipsync.faces.haar import CALIBRATION, HaarDetector, fit_calibration, iou
from tests.conftest import REPO, fixture_path, skip_or_fail

# README boxes: (x1, y1, x2, y2), marked by eye, forehead to chin.
FIXTURE_BOXES = {
    "avatar.jpg": (420, 137, 885, 602),
    "kennedy_low.jpg": (214, 122, 478, 386),
    "mona_low.jpg": (406, 168, 762, 524),
}


def read(name: str) -> np.ndarray:
    image = cv2.imread(str(fixture_path(name)), cv2.IMREAD_COLOR)
    assert image is not None, name
    return image


def assert_near(box: FaceBox, expected, tolerance: float = 0.15, min_iou: float = 0.7) -> None:
    """IoU >= min_iou and every edge within ``tolerance`` of the expected box's size."""
    ex1, ey1, ex2, ey2 = expected
    w, h = ex2 - ex1, ey2 - ey1
    overlap = iou(box.as_list(), expected)
    assert overlap >= min_iou, f"{box.as_list()} vs {list(expected)}: IoU {overlap:.2f}"
    for got, want, size, edge in zip(box.as_list(), expected, (w, h, w, h), ("x1", "y1", "x2", "y2")):
        assert abs(got - want) <= tolerance * size, f"{edge} {got} vs {want} ({abs(got - want) / size:.0%} of the box)"


class CountingHaar(HaarDetector):
    """The real Haar detector, counting how often it actually runs."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def detect(self, image_bgr):
        self.calls += 1
        return super().detect(image_bgr)


class FailingHaar(HaarDetector):
    """Same cache identity as the Haar detector, but must never be asked to detect."""

    def detect(self, image_bgr):
        raise AssertionError("detection ran although the box was cached")


@pytest.fixture(scope="module")
def haar() -> HaarDetector:
    return HaarDetector()


# --------------------------------------------------------------- Haar on fixtures


@pytest.mark.parametrize("name", sorted(FIXTURE_BOXES))
def test_haar_finds_the_fixture_face(name, tmp_path):
    locator = FaceLocator(detector="haar", cache_dir=tmp_path)
    box = locator.locate(read(name))
    assert isinstance(box, FaceBox)
    assert_near(box, FIXTURE_BOXES[name])
    assert locator.describe()["detector"] == "haar"


def test_haar_finds_the_builtin_astronaut_avatar(haar):
    """The service's default avatar (skimage astronaut, RGB -> BGR) must have a face."""
    from skimage import data

    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    box = FaceLocator(detector=haar, cache_dir=None).locate(image)
    assert_near(box, (178, 62, 272, 162))  # marked by eye: fringe to chin, cheek to cheek


@pytest.mark.parametrize("layout", ["grey2d", "grey1ch", "bgra"])
def test_haar_accepts_grey_and_bgra(layout, haar):
    image = read("kennedy_low.jpg")
    if layout == "grey2d":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif layout == "grey1ch":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    box = FaceLocator(detector=haar, cache_dir=None).locate(image)
    assert_near(box, FIXTURE_BOXES["kennedy_low.jpg"])


def test_haar_box_follows_the_face_when_the_image_is_resized(haar):
    image = read("mona_low.jpg")
    small = cv2.resize(image, (640, 360), interpolation=cv2.INTER_AREA)
    box = haar.detect(small)[0][0]
    assert_near(box, FaceBox(*FIXTURE_BOXES["mona_low.jpg"]).scaled(0.5).as_list())


def test_shipped_calibration_is_the_fit_on_the_fixtures(haar):
    """CALIBRATION in haar.py is what fitting the raw cascade boxes to the README boxes gives."""
    pairs: dict[str, list] = {"default": [], "alt2": []}
    for name, target in FIXTURE_BOXES.items():
        cands = [c for c in haar.candidates(read(name)) if c["evidence"] >= haar.min_evidence]
        main = max(cands, key=lambda c: (c["box"][2] - c["box"][0]))
        for key, rect in main["raw"].items():
            pairs[key].append((rect, target))
    for key, params in CALIBRATION.items():
        assert len(pairs[key]) == 3, f"{key} cascade missed a fixture face"
        fitted = fit_calibration(pairs[key])
        assert np.allclose(fitted, params, atol=0.015), f"{key}: fitted {np.round(fitted, 3)}, shipped {params}"


# --------------------------------------------------------------- no face


def _no_face_images():
    rng = np.random.default_rng(7)
    yield "blank", np.full((480, 640, 3), 200, np.uint8)
    yield "noise", rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    # the landscape behind the Mona Lisa, left of her hair
    yield "landscape", lambda: read("mona_low.jpg")[:, :380]
    # the avatar's embroidered jacket: frontalface_default fires on it alone
    yield "jacket", lambda: read("avatar.jpg")[700:]
    from skimage import data

    yield "rocket", lambda: cv2.cvtColor(data.rocket(), cv2.COLOR_RGB2BGR)
    yield "coins", lambda: data.coins()  # grey, a dozen weak single-cascade hits


@pytest.mark.parametrize("name,make", list(_no_face_images()), ids=[n for n, _ in _no_face_images()])
def test_no_face_raises(name, make, haar, tmp_path):
    image = make() if callable(make) else make
    locator = FaceLocator(detector=haar, cache_dir=tmp_path)
    with pytest.raises(NoFaceError) as info:
        locator.locate(image)
    assert info.value.code == "no_face" and info.value.status == 422
    assert str(info.value) == "no face found in the avatar image"
    assert not list(tmp_path.rglob("*.json")), "a negative result must not be cached as a box"
    assert ExportedNoFaceError is NoFaceError


# --------------------------------------------------------------- caches


def test_second_locate_uses_the_memory_cache(tmp_path):
    detector = CountingHaar()
    locator = FaceLocator(detector=detector, cache_dir=tmp_path)
    image = read("kennedy_low.jpg")
    first = locator.locate(image)
    second = locator.locate(image.copy())  # same pixels, another array
    assert first == second
    assert detector.calls == 1
    assert locator.stats == {"detections": 1, "memory_hits": 1, "disk_hits": 0}


def test_disk_cache_survives_a_new_locator(tmp_path):
    image = read("kennedy_low.jpg")
    box = FaceLocator(detector=CountingHaar(), cache_dir=tmp_path).locate(image)

    path = FaceLocator(detector="haar", cache_dir=tmp_path).cache_path(image)
    assert path.parent == tmp_path / "faces" and path.is_file()
    record = json.loads(path.read_text())
    assert record["box"] == box.as_list() and record["detector"] == "haar"
    assert not [p for p in path.parent.iterdir() if p.suffix != ".json"], "temporary files left behind"

    fresh = FaceLocator(detector=FailingHaar(), cache_dir=tmp_path)
    assert fresh.locate(image) == box
    assert fresh.stats["disk_hits"] == 1


def test_without_cache_dir_a_new_locator_detects_again(tmp_path):
    image = read("kennedy_low.jpg")
    FaceLocator(detector=CountingHaar(), cache_dir=None).locate(image)
    again = CountingHaar()
    FaceLocator(detector=again, cache_dir=None).locate(image)
    assert again.calls == 1


def test_a_changed_image_gets_its_own_box(tmp_path):
    detector = CountingHaar()
    locator = FaceLocator(detector=detector, cache_dir=tmp_path)
    image = read("kennedy_low.jpg")
    box = locator.locate(image)
    mirrored = np.ascontiguousarray(image[:, ::-1])
    mbox = locator.locate(mirrored)
    assert detector.calls == 2
    assert len(list((tmp_path / "faces").glob("*.json"))) == 2
    width = image.shape[1]
    # the mirrored face is where the mirror puts it (within a few pixels)
    assert abs(mbox.x1 - (width - box.x2)) <= 0.05 * box.width
    assert abs(mbox.x2 - (width - box.x1)) <= 0.05 * box.width
    # one changed pixel is a different image too
    touched = image.copy()
    touched[0, 0] ^= 1
    assert locator.cache_key(touched) != locator.cache_key(image)


def test_cache_key_depends_on_the_detector(tmp_path):
    image = read("kennedy_low.jpg")
    FaceLocator(detector="haar", cache_dir=tmp_path).locate(image)
    other = CountingHaar(min_evidence=41)  # different settings: different cache_id
    FaceLocator(detector=other, cache_dir=tmp_path).locate(image)
    assert other.calls == 1


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    image = read("kennedy_low.jpg")
    locator = FaceLocator(detector="haar", cache_dir=tmp_path)
    path = locator.cache_path(image)
    path.parent.mkdir(parents=True)
    path.write_text('{"box": [1, 2')
    detector = CountingHaar()
    box = FaceLocator(detector=detector, cache_dir=tmp_path).locate(image)
    assert detector.calls == 1
    assert json.loads(path.read_text())["box"] == box.as_list()
    # a box that does not fit the image is not trusted either
    path.write_text(json.dumps({**json.loads(path.read_text()), "box": [0, 0, 5000, 10]}))
    detector2 = CountingHaar()
    assert FaceLocator(detector=detector2, cache_dir=tmp_path).locate(image) == box
    assert detector2.calls == 1


def test_concurrent_locates_detect_once(tmp_path):
    detector = CountingHaar()
    locator = FaceLocator(detector=detector, cache_dir=tmp_path)
    image = read("kennedy_low.jpg")
    results, errors = [], []
    barrier = threading.Barrier(4)

    def work():
        try:
            barrier.wait()
            results.append(locator.locate(image))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and len(set(results)) == 1
    assert detector.calls == 1


# --------------------------------------------------------------- override and config


def test_override_wins_and_is_clipped(tmp_path):
    image = read("kennedy_low.jpg")
    locator = FaceLocator(detector="s3fd", s3fd_path=tmp_path / "absent.pth", cache_dir=tmp_path,
                          box_override=(10, 20, 110, 140))
    assert locator.locate(image) == FaceBox(10, 20, 110, 140)
    assert locator.describe() == {"detector": "manual", "box": [10, 20, 110, 140]}
    assert not (tmp_path / "faces").exists()
    clipped = FaceLocator(box_override=FaceBox(-20, 400, 100, 900), cache_dir=None).locate(image)
    assert clipped == FaceBox(0, 400, 100, 480)


def test_override_outside_the_image_is_a_clear_error():
    image = read("kennedy_low.jpg")
    locator = FaceLocator(box_override=(700, 10, 800, 100), cache_dir=None)
    with pytest.raises(InvalidInputError, match="outside the 640x480 avatar image"):
        locator.locate(image)


@pytest.mark.parametrize("bad", [(10, 10, 10, 50), (50, 10, 20, 60), (1, 2, 3), (1.5, 2, 30, 40)])
def test_malformed_override_is_refused_at_construction(bad):
    with pytest.raises(InvalidInputError):
        FaceLocator(box_override=bad, cache_dir=None)


def test_s3fd_without_weights_fails_at_construction_and_auto_falls_back(tmp_path):
    missing = tmp_path / "s3fd.pth"
    with pytest.raises(CheckpointError, match="s3fd.pth"):
        FaceLocator(detector="s3fd", s3fd_path=missing, cache_dir=None)
    assert FaceLocator(detector="auto", s3fd_path=missing, cache_dir=None).describe()["detector"] == "haar"
    with pytest.raises(ValueError):
        FaceLocator(detector="dlib", cache_dir=None)


@pytest.mark.parametrize("bad", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10, 3), np.float32),
                                 np.zeros((10, 10, 2), np.uint8), "avatar.jpg"])
def test_unusable_arrays_are_invalid_input(bad):
    with pytest.raises(InvalidInputError):
        FaceLocator(detector="haar", cache_dir=None).locate(bad)


# --------------------------------------------------------------- S3FD network and weights


@pytest.fixture(scope="module")
def random_state() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    return s3fd.S3FD().state_dict()


@pytest.fixture(scope="module")
def random_weights_file(random_state, tmp_path_factory) -> Path:
    """The random state dict saved bare, as s3fd-619a316812.pth is."""
    path = tmp_path_factory.mktemp("s3fd") / "s3fd-619a316812.pth"
    torch.save(random_state, path)
    return path


def test_state_dict_has_the_published_layout(random_state):
    assert len(random_state) == 65
    assert sum(v.numel() for v in random_state.values()) == 22_459_110  # s3fd-619a316812.pth: 89.8 MB of float32
    expected = {
        "conv1_1.weight": (64, 3, 3, 3),
        "conv3_3_norm.weight": (256,),
        "conv4_3_norm.weight": (512,),
        "conv5_3_norm.weight": (512,),
        "fc6.weight": (1024, 512, 3, 3),
        "fc7.weight": (1024, 1024, 1, 1),
        "conv6_2.weight": (512, 256, 3, 3),
        "conv7_2.weight": (256, 128, 3, 3),
        "conv3_3_norm_mbox_conf.weight": (4, 256, 3, 3),
        "conv3_3_norm_mbox_loc.weight": (4, 256, 3, 3),
        "fc7_mbox_conf.weight": (2, 1024, 3, 3),
        "conv7_2_mbox_loc.bias": (4,),
    }
    for key, shape in expected.items():
        assert tuple(random_state[key].shape) == shape, key
    fresh = s3fd.S3FD()
    assert torch.equal(fresh.conv3_3_norm.weight, torch.full((256,), 10.0))
    assert torch.equal(fresh.conv4_3_norm.weight, torch.full((512,), 8.0))
    assert torch.equal(fresh.conv5_3_norm.weight, torch.full((512,), 5.0))


@pytest.mark.parametrize("layout", ["bare", "wrapped", "module", "wrapped_module"])
def test_weights_load_strictly_in_every_layout(layout, random_state, tmp_path):
    state = random_state
    if "module" in layout:
        state = OrderedDict(("module." + k, v) for k, v in state.items())
    obj = {"state_dict": state, "optimizer": {}, "global_step": 3} if "wrapped" in layout else state
    path = tmp_path / "s3fd.pth"
    torch.save(obj, path)
    loaded = s3fd.load_state_dict(path)
    net = s3fd.S3FD()
    net.load_state_dict(loaded, strict=True)
    for key, value in random_state.items():
        assert torch.equal(net.state_dict()[key], value), key


def test_detector_loads_a_published_layout_file(random_state, random_weights_file):
    path = random_weights_file
    det = s3fd.S3FDDetector(path, "cpu")
    assert det.name == "s3fd" and det.device.type == "cpu"
    assert torch.equal(det.net.fc7.weight, random_state["fc7.weight"])
    assert not det.net.training
    locator = FaceLocator(detector="auto", s3fd_path=path, cache_dir=None)
    assert locator.describe()["detector"] == "s3fd"


def _broken_files(state):
    wrong_shape = OrderedDict(state)
    wrong_shape["conv3_3_norm_mbox_conf.weight"] = torch.zeros(2, 256, 3, 3)
    missing = OrderedDict(state)
    del missing["conv7_2_mbox_loc.bias"]
    extra = OrderedDict(state)
    extra["conv8_1.weight"] = torch.zeros(1)
    return {"wrong_shape": wrong_shape, "missing_key": missing, "extra_key": extra,
            "not_a_state_dict": {"epoch": 3},
            "wav2lip_like": {"state_dict": {"audio_encoder.0.weight": torch.zeros(1)}}}


@pytest.mark.parametrize(
    "case",
    [
        "wrong_shape",
        "missing_key",
        "extra_key",
        "not_a_state_dict",
        "wav2lip_like",
        "garbage_bytes",
        "truncated",
        "missing_file",
    ],
)
def test_broken_weights_raise_checkpoint_error(case, random_state, random_weights_file, tmp_path):
    path = tmp_path / "s3fd.pth"
    if case == "garbage_bytes":
        path.write_bytes(os.urandom(4096))
    elif case == "truncated":
        data = random_weights_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case != "missing_file":
        torch.save(_broken_files(random_state)[case], path)
    with pytest.raises(CheckpointError) as info:
        s3fd.S3FDDetector(path, "cpu")
    assert info.value.code == "checkpoint_invalid"
    assert str(path) in str(info.value)
    assert "Traceback" not in str(info.value)


def test_auto_with_a_broken_weights_file_is_an_error_not_a_silent_fallback(tmp_path):
    path = tmp_path / "s3fd.pth"
    path.write_bytes(b"<html>404 Not Found</html>")  # a failed download saved as the weights
    with pytest.raises(CheckpointError, match="could not read S3FD weights"):
        FaceLocator(detector="auto", s3fd_path=path, cache_dir=None)


def test_forward_shapes_and_background_max_out():
    torch.manual_seed(1)
    net = s3fd.S3FD().eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 128, 192) * 50)
    assert len(outs) == 12
    maps = [(32, 48), (16, 24), (8, 12), (8, 10), (4, 5), (2, 3)]  # fc7: H/32 + 4 (fc6 pads by 3)
    for i, (h, w) in enumerate(maps):
        assert tuple(outs[2 * i].shape) == (1, 2, h, w)
        assert tuple(outs[2 * i + 1].shape) == (1, 4, h, w)
    # conv3_3's head has 3 background scores and 1 face score; the output keeps their max and the face score
    with torch.no_grad():
        net.conv3_3_norm_mbox_conf.weight.zero_()
        net.conv3_3_norm_mbox_conf.bias.copy_(torch.tensor([1.0, 3.0, 2.0, 0.5]))
        cls1 = net(torch.zeros(1, 3, 64, 64))[0]
    assert torch.allclose(cls1[0, 0], torch.full((16, 16), 3.0))
    assert torch.allclose(cls1[0, 1], torch.full((16, 16), 0.5))


def _logit_maps(size=(256, 256)):
    """Outputs for a 256x256 input: all background, except what the test sets."""
    outs = []
    for stride in s3fd.STRIDES:
        h, w = size[0] // stride, size[1] // stride
        cls = np.zeros((1, 2, h, w), np.float32)
        cls[0, 0], cls[0, 1] = 5.0, -5.0
        outs += [cls, np.zeros((1, 4, h, w), np.float32)]
    return outs


def test_decoder_and_nms_on_hand_built_maps():
    outs = _logit_maps()
    # A: stride 8, cell (row 10, col 12): anchor centre (100, 84), side 32
    outs[2][0, :, 10, 12] = (-4.0, 4.0)
    outs[3][0, :, 10, 12] = (0.5, -0.25, np.log(1.5) / 0.2, 0.0)
    # B: its neighbour (anchor centre (108, 84)), lower score, overlaps A by IoU ~0.65: suppressed
    outs[2][0, :, 10, 13] = (-2.0, 2.0)
    # C: stride 32, cell (2, 5): anchor centre (176, 80), side 128, barely overlaps A: kept
    outs[6][0, :, 2, 5] = (-1.0, 2.0)
    # D: stride 4, probability 0.45: below the 0.5 threshold
    outs[0][0, :, 40, 40] = (0.1, -0.1)
    # E: stride 4, cell (60, 2): anchor centre (10, 242), side 16, probability 0.55: kept
    outs[0][0, :, 60, 2] = (0.0, 0.2)

    dets = s3fd.postprocess(outs, score_threshold=0.5, nms_threshold=0.3)

    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731 - 2-class softmax
    expected = np.array(
        [
            [
                101.6 - 24,
                83.2 - 16,
                101.6 + 24,
                83.2 + 16,
                sig(8.0),
            ],  # A: centre moved by 0.1*32*(0.5, -0.25), width x1.5
            [112, 16, 240, 144, sig(3.0)],  # C: the anchor itself
            [2, 234, 18, 250, sig(0.2)],  # E: the anchor itself
        ]
    )
    assert dets.shape == (3, 5)
    np.testing.assert_allclose(dets, expected, rtol=0, atol=1e-3)

    # without NMS, B is there too
    raw = s3fd.decode([_softmax(o) if i % 2 == 0 else o for i, o in enumerate(outs)], 0.5)
    assert len(raw) == 4
    assert s3fd.nms(np.zeros((0, 5), np.float32)).size == 0


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_pipeline_scales_boxes_back_to_the_image(tmp_path):
    """A network set by hand to answer 'face' on every stride-128 anchor with zero offsets.

    Its boxes are then exactly the 512-px anchors of the shrunk image: on a
    1280-wide image (shrunk by 2 to 640) they must come back 1024 px wide.
    """
    net = s3fd.S3FD()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv3_3_norm_mbox_conf.bias.copy_(torch.tensor([5.0, 5.0, 5.0, 0.0]))
        for head in ("conv4_3_norm", "conv5_3_norm", "fc7", "conv6_2"):
            getattr(net, f"{head}_mbox_conf").bias.copy_(torch.tensor([5.0, 0.0]))
        net.conv7_2_mbox_conf.bias.copy_(torch.tensor([0.0, 5.0]))
    path = tmp_path / "s3fd.pth"
    torch.save(net.state_dict(), path)
    det = s3fd.S3FDDetector(path, "cpu")

    image = np.full((256, 1280, 3), 127, np.uint8)
    dets = det.detect_raw(image)
    assert len(dets) >= 1
    np.testing.assert_allclose(dets[:, 2] - dets[:, 0], 1024.0, atol=1e-3)
    np.testing.assert_allclose(dets[:, 3] - dets[:, 1], 1024.0, atol=1e-3)
    np.testing.assert_allclose(dets[:, 4], 1.0 / (1.0 + np.exp(-5.0)), atol=1e-5)
    # anchor centres at 64 + 128 k in the 640-px input: 128 + 256 k here
    centres = (dets[:, 0] + dets[:, 2]) / 2
    np.testing.assert_allclose((centres - 128) % 256, 0.0, atol=1e-3)

    faces = det.detect(image)
    assert faces and all(0 <= b.x1 < b.x2 <= 1280 and 0 <= b.y1 < b.y2 <= 256 for b, _ in faces)
    box = FaceLocator(detector=det, cache_dir=tmp_path).locate(image)
    assert box == faces[0][0]


@pytest.mark.slow  # S3FD on the full-size avatar: seconds on a CPU
def test_random_weights_run_end_to_end_on_the_avatar(random_weights_file):
    """Random weights detect nonsense, but the whole path must run and keep its types."""
    det = s3fd.S3FDDetector(random_weights_file, "cpu")
    image = read("avatar.jpg")
    faces = det.detect(image)
    h, w = image.shape[:2]
    assert isinstance(faces, list)
    for box, score in faces:
        assert isinstance(box, FaceBox) and isinstance(score, float) and 0.5 < score <= 1.0
        assert 0 <= box.x1 < box.x2 <= w and 0 <= box.y1 < box.y2 <= h
    # raw detections, on a grey copy (small, to stay fast)
    grey = cv2.cvtColor(cv2.resize(image, (258, 297), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    dets = det.detect_raw(grey)
    assert dets.dtype == np.float32 and dets.ndim == 2 and dets.shape[1] == 5
    assert np.all(dets[:, 4] > 0.5) and np.all(dets[:, 4] <= 1.0)
    assert np.all(np.diff(dets[:, 4]) <= 0), "best score first"


def _real_weights() -> Path | None:
    for candidate in (
        os.environ.get("S3FD_PATH"),
        REPO / "checkpoints" / "s3fd.pth",
        REPO / "checkpoints" / "s3fd-619a316812.pth",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIXTURE_BOXES))
def test_real_s3fd_weights_find_the_fixture_faces(name, haar):
    weights = _real_weights()
    if weights is None:
        reason = "real S3FD weights not installed (set S3FD_PATH or put s3fd.pth in checkpoints/)"
        if os.environ.get("S3FD_PATH"):  # asked for and missing: fails on CI (skip_or_fail)
            skip_or_fail(f"{reason}: S3FD_PATH={os.environ['S3FD_PATH']} is not a file")
        # an optional download no CI machine has (nothing in requirements installs it): a plain skip
        pytest.skip(reason)
    det = s3fd.S3FDDetector(weights, "cpu")
    image = read(name)
    faces = det.detect(image)
    assert faces, "S3FD found no face"
    assert_near(faces[0][0], FIXTURE_BOXES[name])
    # and the Haar fallback frames the face like S3FD does
    assert_near(haar.detect(image)[0][0], faces[0][0].as_list())
