"""Frames made by ``lipsync.media.gpu_frames`` equal the CPU path's, byte for byte.

The CPU path: ``video.composite`` -> ``apply_idle`` -> ``cv2.cvtColor(COLOR_BGR2YUV_I420)``
per frame. The same torch code runs on the GPU in production; here it runs on torch's CPU
device (and on CUDA where there is one: the device run in docs/PERFORMANCE.md records it).
Only NumPy, OpenCV and torch are needed, so this file runs on the GPU machine as it is.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from lipsync.engines.base import PreparedAvatar, Region
from lipsync.engines.wav2lip.engine import paste_mask
from lipsync.faces.box import FaceBox
from lipsync.faces.landmarks import face_landmarks
from lipsync.media import video
from lipsync.media.gpu_frames import GpuFrames
from lipsync.media.torch_image import i420, remap_linear
from lipsync.motion.idle import apply_idle, idle_track, prepare_idle
from tests.conftest import fixture_path

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The OpenCV the project pins (requirements.txt): its remap samples in fixed point, which
# GpuFrames reproduces. OpenCV 5 samples differently (up to 3 levels apart on the same input),
# so where a machine has 5.x (the GPU machine's image) the GPU is compared with the same code on
# torch's CPU device, and the CPU device with OpenCV 4's sampling written out in NumPy.
OPENCV_4 = cv2.__version__.startswith("4.")


def _remap_opencv4(src: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """``cv2.remap(src, map_x, map_y, INTER_LINEAR, borderMode=BORDER_REPLICATE)`` of OpenCV 4.x
    for an 8-bit image: coordinates rounded to 1/32 pixel, weights in 1/1024, rounded sum."""
    h, w = src.shape[:2]
    qx = np.rint(map_x.astype(np.float64) * 32).astype(np.int64)
    qy = np.rint(map_y.astype(np.float64) * 32).astype(np.int64)
    x0, fx, y0, fy = qx >> 5, (qx & 31)[..., None], qy >> 5, (qy & 31)[..., None]
    pixels = src.astype(np.int64)

    def at(y, x):
        return pixels[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)]

    total = (at(y0, x0) * (32 - fx) * (32 - fy) + at(y0, x0 + 1) * fx * (32 - fy)
             + at(y0 + 1, x0) * (32 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    return ((total + 512) >> 10).astype(np.uint8)


def _avatar(height: int = 480) -> tuple[PreparedAvatar, object]:
    """avatar.jpg at ``height`` lines with its face box, the Wav2Lip blend mask and the idle rig."""
    image = cv2.imread(str(fixture_path("avatar.jpg")))
    scale = height / image.shape[0]
    image = video.fit_to_height(image, height)
    box = FaceBox(420, 137, 885, 602).scaled(scale).clip(image.shape[1], image.shape[0])
    region = Region(box.x1, box.y1, box.x2, box.y2 + 4).clip(image.shape[1], image.shape[0])
    landmarks = face_landmarks(image, box)
    avatar = PreparedAvatar(image=image, box=box, region=region, mask=paste_mask(image, box, region, landmarks))
    return avatar, prepare_idle(image, box, landmarks)


def _patches(avatar: PreparedAvatar, n: int, seed: int) -> np.ndarray:
    """Mouth-like patches: the avatar's crop, shifted and darkened differently in each frame."""
    r = avatar.region
    crop = avatar.image[r.y1:r.y2, r.x1:r.x2].astype(np.int16)
    rng = np.random.default_rng(seed)
    out = np.empty((n, r.height, r.width, 3), np.uint8)
    for i in range(n):
        noise = rng.integers(-40, 40, crop.shape, dtype=np.int16)
        out[i] = np.clip(np.roll(crop, int(rng.integers(-8, 8)), axis=0) + noise, 0, 255)
    return out


def _cpu_frames(avatar, rig, track, patches, first):
    moved = np.empty_like(avatar.image)
    out = []
    for k, frame in enumerate(video.composite(avatar, [patches])):
        if track is not None:
            frame = apply_idle(frame, rig, track, first + k, out=moved)
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_i420_is_opencvs_conversion(device):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 38, 52, 3), dtype=np.uint8)
    got = i420(torch.from_numpy(frames).to(device)).cpu().numpy()
    for frame, planes in zip(frames, got):
        assert np.array_equal(planes, cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420))


@pytest.mark.parametrize("device", DEVICES)
def test_remap_is_opencvs_bilinear_remap(device):
    """Random maps reaching past every border: the fixed-point sampling, bit for bit."""
    rng = np.random.default_rng(2)
    h, w = 41, 57
    src = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    maps = [(xx + rng.uniform(-4, 4, (h, w))).astype(np.float32) for _ in range(2)], \
        [(yy + rng.uniform(-4, 4, (h, w))).astype(np.float32) for _ in range(2)]
    mx, my = (torch.from_numpy(np.stack(m)).to(device) for m in maps)
    got = remap_linear(torch.from_numpy(src).to(device), mx, my).cpu().numpy()
    for k in range(2):
        want = _remap_opencv4(src[k], maps[0][k], maps[1][k])
        assert np.array_equal(got[k], want)
        if OPENCV_4:
            assert np.array_equal(want, cv2.remap(src[k], maps[0][k], maps[1][k], cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_REPLICATE))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idle", [False, True])
def test_gpu_frames_equal_the_cpu_path(device, idle):
    """Composite, idle motion (sway, breathing, blinks, brows) and I420 of 60 frames, starting
    mid-track (a later sentence), against the CPU path: identical bytes."""
    avatar, rig = _avatar()
    n, first = 60, 40
    track = idle_track(first + n, 25, seed=5, face_height=rig.face_height,
                       mouth_open=np.abs(np.sin(np.arange(first + n) / 3.0))) if idle else None
    assert track is None or (track.blink > 0).any() or (track.brow > 0).any()
    patches = _patches(avatar, n, seed=3)
    if OPENCV_4 or not idle:
        want = _cpu_frames(avatar, rig, track, patches, first)
    elif device == "cpu":
        pytest.skip(f"OpenCV {cv2.__version__} is not the pinned 4.x: its remap is not the reference")
    else:  # the GPU against the same code on the CPU, which CI compares with OpenCV 4
        want = list(GpuFrames(avatar, "cpu", rig).frames(patches, first, track))
    gpu = GpuFrames(avatar, device, rig)
    got = list(gpu.frames(torch.from_numpy(patches).to(device), first, track))
    assert len(got) == n
    diff = [int(np.abs(g.astype(np.int16) - w).max()) for g, w in zip(got, want)]
    assert max(diff) == 0, f"max difference per frame: {diff}"


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_frames_in_another_order_are_the_same_frames(device):
    """Frames asked for by number (a segmented writer's interleaved order): each is the frame
    time order gives, idle motion included."""
    avatar, rig = _avatar()
    n = 40
    track = idle_track(n, 25, seed=5, face_height=rig.face_height)
    patches = _patches(avatar, n, seed=3)
    want = list(GpuFrames(avatar, device, rig).frames(patches, 0, track))
    order = np.random.default_rng(3).permutation(n)
    got = list(GpuFrames(avatar, device, rig).frames(patches[order], order, track))
    assert all(np.array_equal(g, want[i]) for g, i in zip(got, order))


def test_gpu_frames_without_a_mask_or_motion_are_the_avatar():
    avatar, _ = _avatar(240)
    blank = PreparedAvatar(image=avatar.image, box=avatar.box, region=avatar.region,
                           mask=np.zeros_like(avatar.mask))
    frames = list(GpuFrames(blank, "cpu").frames(_patches(blank, 3, seed=4)))
    want = cv2.cvtColor(avatar.image, cv2.COLOR_BGR2YUV_I420)
    assert len(frames) == 3 and all(np.array_equal(f, want) for f in frames)


@pytest.mark.slow
def test_a_request_with_its_frames_made_by_gpu_frames_is_the_same_video(tmp_path, monkeypatch):
    """The request's own loop on the GPU path (GpuFrames and the built-in engine's mouth states
    here on the CPU device: the code CUDA runs, each batch's frames handed on once the next is
    queued, segments fed in turn) against the CPU path: the same decoded frames, idle motion on."""
    if not OPENCV_4:
        pytest.skip(f"OpenCV {cv2.__version__} is not the pinned 4.x: its remap is not the reference")
    from lipsync.engines.builtin.device_mouth import DeviceMouth
    from lipsync.service import LipsyncService
    from lipsync.settings import Settings
    from tests.media import decoded_frames, probe

    drawn = []

    def counted(draw):
        def spy(self, states):
            drawn.append(len(states))
            return draw(self, states)
        return spy

    wav = open(fixture_path("kennedy_speech_16k.wav"), "rb").read()
    videos = {}
    for path in ("cpu", "gpu_frames"):
        settings = Settings(engine="builtin", face_detector="haar", device="cpu", encode_workers=3,
                            output_dir=str(tmp_path / path), cache_dir=str(tmp_path / "cache"),
                            avatar_path=str(fixture_path("avatar.jpg")), max_output_height=360, idle_motion=True)
        service = LipsyncService(settings).load()
        assert service.status == "ready", service.error
        if path == "gpu_frames":  # the frames and the mouth states (BuiltinEngine.device) made by torch
            monkeypatch.setattr(service, "_on_gpu", lambda: torch.device("cpu"))
            monkeypatch.setattr(service.models.engine("builtin"), "device", torch.device("cpu"))
            monkeypatch.setattr(DeviceMouth, "draw", counted(DeviceMouth.draw))
        out = tmp_path / f"{path}.mp4"
        service.generate(str(out), recording=wav)
        videos[path] = (probe(out), list(decoded_frames(out)))
    (cpu_info, cpu), (gpu_info, gpu) = videos["cpu"], videos["gpu_frames"]
    assert drawn, "the mouth states were not drawn by torch"
    assert gpu_info["frames"] == cpu_info["frames"] == len(gpu) == len(cpu) == 176
    # A painted pixel may be 1/255 apart (device_mouth: exp rounds differently), which the encoder
    # may spread over its block; a frame handed on with the wrong number differs everywhere.
    apart = [float(np.abs(a.astype(np.int16) - b).mean()) for a, b in zip(cpu, gpu)]
    different = [i for i, d in enumerate(apart) if d > 0]
    assert max(apart) < 0.02 and len(different) <= 4, f"frames that differ: {different[:10]} by {max(apart):.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["builtin", "wav2lip"])
def test_requests_at_once_on_the_gpu_path_are_the_videos_made_one_at_a_time(tmp_path, monkeypatch, engine):
    """Four requests on one service at once, each with different speech, through the GPU path
    (CUDA where there is one, with the Wav2Lip engine's CUDA graphs too; else torch's CPU device):
    each MP4 is byte for byte the one the same request gives alone. Two of them bring their own
    avatar (prepared in the request, so its face features are made while the others run). Frames
    of one request in another's video, or a shared buffer overwritten too early, would change the
    bytes; so did, on an H100, the Wav2Lip face encoder's cuDNN kernels benchmarked again in each
    request's thread (up to 24 grey levels), before the engine ran on one thread of its own."""
    import threading
    import wave

    from lipsync.engines.wav2lip.model import save_random_checkpoint
    from lipsync.media.audio import pcm_wav
    from lipsync.service import LipsyncService
    from lipsync.settings import Settings

    cuda = torch.cuda.is_available()
    with wave.open(str(fixture_path("kennedy_speech_16k.wav"))) as w:  # 16 kHz mono 16-bit
        pcm = w.readframes(w.getnframes())
    # 2.5 s of the speech from 1.5, 3, 4.5 and 6 s: four different requests
    recordings = [pcm_wav(pcm[int(start * 32000):int((start + 2.5) * 32000)]) for start in (1.5, 3.0, 4.5, 6.0)]
    extra = {}
    if engine == "wav2lip":
        extra["checkpoint_path"] = save_random_checkpoint(str(tmp_path / "random.pth"), seed=3)
    # The speech is given: a remote TTS that is never called (the GPU machine has no espeak-ng), and
    # the face box too (its OpenCV 5 has no Haar cascades).
    settings = Settings(engine=engine, face_detector="haar", device="cuda" if cuda else "cpu", encode_workers=2,
                        tts_provider="http", tts_api_url="http://127.0.0.1:9", face_box=(420, 137, 885, 602),
                        output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                        avatar_path=str(fixture_path("avatar.jpg")), max_output_height=360, idle_motion=True, **extra)
    service = LipsyncService(settings).load()
    assert service.status == "ready", service.error
    if not cuda:  # the frames and the built-in engine's mouth states made by torch, as on a GPU
        monkeypatch.setattr(service, "_on_gpu", lambda: torch.device("cpu"))
        monkeypatch.setattr(service.models.engine("builtin"), "device", torch.device("cpu"))
    # The other avatar: avatar.jpg mirrored, a different picture with its face inside the same box.
    mirrored = cv2.imencode(".jpg", cv2.flip(cv2.imread(str(fixture_path("avatar.jpg"))), 1))[1].tobytes()
    avatars = [None, None, mirrored, mirrored]
    alone = []
    for i, recording in enumerate(recordings):
        service.generate(str(tmp_path / f"alone{i}.mp4"), recording=recording, avatar_image=avatars[i])
        alone.append((tmp_path / f"alone{i}.mp4").read_bytes())
    assert len(set(alone)) == 4  # different speech, different videos
    errors = []
    barrier = threading.Barrier(4)

    def request(i: int) -> None:
        try:
            barrier.wait()
            service.generate(str(tmp_path / f"together{i}.mp4"), recording=recordings[i], avatar_image=avatars[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        assert (tmp_path / f"together{i}.mp4").read_bytes() == alone[i], f"request {i} differs when made at once"
