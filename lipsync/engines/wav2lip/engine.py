"""The Wav2Lip lip-sync engine: redraws the lower face of a still avatar.

One engine is built per process and shared by all requests: the model is
loaded once, never changed afterwards, and every call into it runs on the
engine's own thread, one at a time, so concurrent ``render`` calls give
exactly what serial ones give. One thread, not a lock: PyTorch remembers the
cuDNN kernels it benchmarked per thread (``cudnn.benchmark``), so the same
convolution called from another request's thread was benchmarked again and
could run another kernel, with other fp16 roundings (another video).

Per avatar (``prepare``): the face box is padded (spec: bottom + 10 px,
clipped), the crop resized to 96x96, the model's 6-channel input built and
the face encoder run once; its features are reused for every frame, and
with an eager model the decoder's face-feature terms are folded into
per-avatar constants (``lipsync.engines.wav2lip.model.StillFaceDecoder``). Per request
(``render``): 16 kHz speech -> mel -> one 16-column window per video frame ->
batches through the audio encoder and decoder -> 96x96 BGR faces resized to
the region.

Speed paths (docs/PERFORMANCE.md has the numbers):

* CPU, fp32 (default): BatchNorm folded, channels-last, face terms
  precomputed; PyTorch, or ONNX Runtime with ``backend="onnxruntime"``.
* CPU, int8 (``precision="int8"``, opt-in): ONNX Runtime static int8,
  calibrated per engine; its measured error is in ``describe()``.
* CUDA (fp16 by default): channels-last, the decoder replayed as a CUDA graph
  (one per batch size), bicubic resize and rounding on the GPU, one
  device-to-host copy of uint8 patches per batch.
* ``mouth_only=True``: only the output rows the blend mask can show are
  computed (about a quarter less work); the rows above are the avatar's own
  crop. Composited frames are unchanged; the patch above the mask is not the
  model's output.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from lipsync.devices import resolve_device
from lipsync.engines.base import PreparedAvatar, Region, batches, check_order
from lipsync.engines.blend import polygon_mask, smoothstep
from lipsync.engines.wav2lip import onnx_backend
from lipsync.engines.wav2lip.model import FACE_SIZE, StillFaceDecoder, Wav2Lip, load_checkpoint, mouth_rows_start
from lipsync.errors import InvalidInputError, LipsyncError, NoFaceError
from lipsync.faces.box import FaceBox
from lipsync.faces.landmarks import Landmarks, face_landmarks
from lipsync.media import audio
from lipsync.settings import WAV2LIP_BACKENDS, WAV2LIP_PRECISIONS
from lipsync.tts.base import Speech

log = logging.getLogger("lipsync")

PRECISIONS = WAV2LIP_PRECISIONS
BACKENDS = WAV2LIP_BACKENDS
GRAPH_BUCKET = 16  # CUDA graphs are captured for batch sizes that are multiples of this

# Box padding before cropping (pixels), as the published models expect.
PAD_TOP, PAD_BOTTOM, PAD_LEFT, PAD_RIGHT = 0, 10, 0, 0

# The blend mask, as fractions of the region: fully generated from
# MASK_TOP_FULL of the height down to MASK_BOTTOM_FEATHER above the bottom
# edge, fading to nothing at MASK_TOP_ZERO and at the bottom edge;
# horizontally fading over MASK_SIDE_FEATHER of the width at each side. The
# upper face stays the avatar's own pixels (sharper than a 96 px upscale).
MASK_TOP_ZERO = 0.46
MASK_TOP_FULL = 0.64
MASK_BOTTOM_FEATHER = 0.07
MASK_SIDE_FEATHER = 0.16
# ... narrowed to the lower face outlined by the face mesh, grown and feathered by these
# fractions of the box height (the model's jaw line need not match the avatar's exactly).
LOWER_FACE_GROW = 0.03
LOWER_FACE_FEATHER = 0.06


def feather_mask(height: int, width: int) -> np.ndarray:
    """(height, width, 1) float32 blend weight: 1 over mouth and chin, 0 on every border.

    Separable product of smoothstep ramps (continuous slope, so no visible
    edge): rows fade in between MASK_TOP_ZERO and MASK_TOP_FULL of the height
    and out over the last MASK_BOTTOM_FEATHER; columns fade over
    MASK_SIDE_FEATHER at each side. The outermost pixel rows and columns are
    exactly 0.
    """
    y = np.arange(height, dtype=np.float64)
    x = np.arange(width, dtype=np.float64)
    top = smoothstep(0.0, 1.0, (y - MASK_TOP_ZERO * (height - 1)) / max(1.0, (MASK_TOP_FULL - MASK_TOP_ZERO) * height))
    bottom = smoothstep(0.0, 1.0, (height - 1 - y) / max(1.0, MASK_BOTTOM_FEATHER * height))
    side_px = max(1.0, MASK_SIDE_FEATHER * width)
    sides = smoothstep(0.0, 1.0, x / side_px) * smoothstep(0.0, 1.0, (width - 1 - x) / side_px)
    mask = (top * bottom)[:, None] * sides[None, :]
    return mask[:, :, None].astype(np.float32)


def paste_mask(image: np.ndarray, box: FaceBox, region: Region, landmarks: Landmarks | None = None) -> np.ndarray:
    """(region.height, region.width, 1) float32: where the model's face replaces the avatar.

    ``feather_mask`` (the lower part of the crop, zero on every border and above
    ``MASK_TOP_ZERO``, which ``mouth_only`` relies on) narrowed to the lower face the
    face mesh outlines (below the nose, inside the jaw line, grown and feathered by a
    few per cent of the box): the cheeks' edges, the neck and the background stay the
    avatar's own pixels. Without landmarks (the mesh sees no face) the rectangle alone.
    ``landmarks``: the face mesh of ``box`` if the caller has it (else it is looked for).
    """
    mask = feather_mask(region.height, region.width)
    if landmarks is None:
        landmarks = face_landmarks(image, box)
    if landmarks is None:
        return mask
    size = float(box.height)
    face = polygon_mask(landmarks.lower_face(), region, grow=LOWER_FACE_GROW * size,
                        feather=LOWER_FACE_FEATHER * size)
    return mask * face[:, :, None]


def _face96(crop: np.ndarray) -> np.ndarray:
    """A face crop (h, w, 3) uint8 BGR at the model's 96x96."""
    if crop.shape[:2] == (FACE_SIZE, FACE_SIZE):
        return crop
    # INTER_AREA when shrinking: a large face then looks like the
    # low-resolution faces the model was trained on instead of aliasing.
    shrink = crop.shape[0] > FACE_SIZE and crop.shape[1] > FACE_SIZE
    return cv2.resize(crop, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _face_input(crop: np.ndarray) -> np.ndarray:
    """The model's face input for a crop: (96, 96, 6) float32 in [0, 1], the crop with its
    lower half blacked out, then the crop itself as the reference (the spec's order)."""
    face = _face96(crop)
    masked = face.copy()
    masked[FACE_SIZE // 2:] = 0
    return np.concatenate([masked, face], axis=2).astype(np.float32) / 255.0


@dataclass(frozen=True)
class _Wav2LipState:
    """Per-avatar data: the model input, the face encoder's features and the decoder's constants."""

    faces: torch.Tensor                      # (1, 6, 96, 96) on the engine's device/dtype
    features: tuple[torch.Tensor, ...] | None  # encode_faces(faces); None for a scripted model
    crop: np.ndarray                         # (96, 96, 3) uint8 BGR reference crop
    constants: tuple[Any, ...] = ()          # StillFaceDecoder.constants(features) (tensors, or arrays for ORT)
    top: torch.Tensor | None = None          # (1, 3, rows_from, 96) float32 crop rows above the mouth, CUDA only


def resize_faces_torch(faces: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, 96, 96) float in [0, 255] -> (B, height, width, 3) uint8, as the CPU path does it.

    Bicubic (A = -0.75, half-pixel centres, edge pixels repeated), like
    ``cv2.resize(..., INTER_CUBIC)`` on float input, then clipped and rounded
    half to even like ``np.rint``. Runs wherever ``faces`` is (the GPU).
    """
    out = nn.functional.interpolate(faces.float(), size=(height, width), mode="bicubic", align_corners=False)
    return out.clamp_(0.0, 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class _EngineThread:
    """Runs calls one at a time on one long-lived thread and waits for each (the engine's "lock").

    ``cudnn.benchmark``'s choices live in a thread-local cache in PyTorch's cuDNN v8 path: run
    from whichever request thread called, a convolution was timed again in every new thread,
    and under load another kernel could win, so the same request gave other frames (seen on an
    H100: four requests at once, two with an avatar of their own, up to 24 grey levels apart).
    On one thread every call finds the kernels chosen once."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None

    def run(self, call: Callable[[], Any]) -> Any:
        """``call()`` on the engine thread (at once when already there), in inference mode."""
        if threading.get_ident() == self._ident:
            return call()
        return self._pool.submit(self._inference, call).result()

    def _inference(self, call: Callable[[], Any]) -> Any:
        self._ident = threading.get_ident()
        with torch.inference_mode():
            return call()


class _CudaGraphDecoder:
    """A ``StillFaceDecoder`` replayed as one CUDA graph per batch size (fixed-shape static buffers).

    The engine pads batches to multiples of ``GRAPH_BUCKET``, so at most
    ``batch_size / GRAPH_BUCKET`` graphs are ever captured.

    The per-avatar constants are copied into the graph's static inputs when
    the avatar changes; called on the engine's thread only.
    """

    def __init__(self, decoder: StillFaceDecoder, dtype: torch.dtype, memory_format):
        self.decoder = decoder
        self.dtype = dtype
        self.memory_format = memory_format
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, list[torch.Tensor], torch.Tensor]] = {}
        # batch -> the state whose constants are in the static inputs. The object
        # itself, not its id(): a per-request avatar's state is freed after the
        # request and the next one may get the same id, which would skip the copy
        # and draw the new request with the previous avatar's face.
        self._loaded: dict[int, object] = {}

    def __call__(self, mel: torch.Tensor, state: _Wav2LipState) -> torch.Tensor:
        batch = mel.size(0)
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(mel, state.constants)
            self._loaded[batch] = state
        graph, static_mel, static_consts, static_out = self._graphs[batch]
        if self._loaded.get(batch) is not state:
            for dst, src in zip(static_consts, state.constants):
                dst.copy_(src)
            self._loaded[batch] = state
        static_mel.copy_(mel)
        graph.replay()
        return static_out

    def _capture(self, mel: torch.Tensor, constants):
        static_mel = mel.clone()
        static_consts = [c.clone() for c in constants]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up (cuDNN picks its algorithms) outside the capture
                self.decoder(static_mel, *static_consts)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.decoder(static_mel, *static_consts)
        return graph, static_mel, static_consts, static_out


class Wav2LipEngine:
    """``lipsync.engines.base.Engine`` backed by a Wav2Lip checkpoint.

    ``model_path``: any layout ``lipsync.engines.wav2lip.model.load_model`` reads.
    ``device``: "auto" (CUDA when available), "cpu" or "cuda".
    ``batch_size``: video frames per model call (memory grows linearly; about
    8 MB per frame on CPU in fp32).
    ``precision``: "auto" (fp16 on CUDA, fp32 on CPU), "fp32", "fp16" (CUDA
    only) or "int8" (CPU only, ONNX Runtime static int8; needs onnxruntime
    and onnx; opt-in: its error against fp32 is measured when it is built and
    reported by ``describe()`` as ``int8_error``, in 1/255).
    ``backend``: CPU runtime, "torch" or "onnxruntime" ("auto": ONNX Runtime
    on a CPU when it is installed, else torch; int8 always uses ONNX Runtime).
    ``mouth_only``: compute only the face rows the blend mask can show.
    ``cuda_graphs``: replay the decoder as CUDA graphs on CUDA.
    ``int8_max_error``: int8 is kept only when its self-check error is at
    most this (1/255 units); otherwise the engine logs a warning and runs
    ONNX Runtime fp32 (``describe()`` then says ``precision: fp32`` and keeps
    ``int8_error``).
    Raises ``CheckpointError`` when the checkpoint cannot be used and
    ``LipsyncError`` (code ``invalid_settings``) for impossible combinations.
    """

    name = "wav2lip"

    def __init__(self, model_path: str, device: str = "auto", batch_size: int = 64, precision: str = "auto",
                 backend: str = "auto", mouth_only: bool = False, cuda_graphs: bool = True,
                 int8_max_error: float = 1.5):
        if int(batch_size) < 1:
            raise ValueError("batch_size must be at least 1")
        if precision not in PRECISIONS:
            raise LipsyncError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}",
                               code="invalid_settings")
        if backend not in BACKENDS:
            raise LipsyncError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}",
                               code="invalid_settings")
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        if precision == "auto":
            precision = "fp16" if cuda else "fp32"
        if precision == "fp16" and not cuda:
            raise LipsyncError("precision fp16 needs a CUDA GPU (use fp32 or int8 on a CPU)", code="invalid_settings")
        if precision == "int8" and cuda:
            raise LipsyncError("precision int8 is for CPUs (use fp16 on a GPU)", code="invalid_settings")
        self._backend_chosen = backend == "auto"
        if backend == "auto":  # ONNX Runtime is the faster CPU runtime (docs/PERFORMANCE.md) when installed
            backend = "onnxruntime" if precision == "int8" or (not cuda and onnx_backend.available()) else "torch"
        if backend == "onnxruntime" and cuda:
            raise LipsyncError("the onnxruntime back end is for CPUs", code="invalid_settings")
        if precision == "int8" and backend != "onnxruntime":
            raise LipsyncError("precision int8 runs on the onnxruntime back end", code="invalid_settings")
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
            if precision == "fp32":  # fp32 means fp32: no TF32 (10-bit mantissa) convolutions
                torch.backends.cudnn.allow_tf32 = False
        self.precision = precision
        self.int8_max_error = float(int8_max_error)
        loaded = load_checkpoint(model_path, "cpu")
        model = loaded.model
        self._info = loaded.info
        self._eager = isinstance(model, Wav2Lip)
        self.backend = backend if self._eager else "torchscript"
        self.mouth_only = bool(mouth_only) and self._eager
        self.rows_from = mouth_rows_start(MASK_TOP_ZERO) if self.mouth_only else 0
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        self._memory_format = torch.channels_last if self._eager else torch.contiguous_format
        self._decoder: StillFaceDecoder | None = None
        self._ort = None                     # lipsync.onnx_backend.OrtDecoder, built at the first prepare
        self._graphs: _CudaGraphDecoder | None = None
        if self._eager:
            self._decoder = StillFaceDecoder(model, self.rows_from).eval()
            if self.backend == "torch":
                self._decoder = self._decoder.to(self.device, self._dtype).to(memory_format=self._memory_format)
                if cuda and cuda_graphs:
                    self._graphs = _CudaGraphDecoder(self._decoder, self._dtype, self._memory_format)
            # The face encoder runs once per avatar: keep it in fp32 (CPU) or fp16 (CUDA).
            model = model.to(self.device, self._dtype)
        elif cuda:
            model = model.to(self.device, self._dtype)
        self._model = model.eval()
        self._thread = _EngineThread("wav2lip")
        self._graphs_ready = False  # every batch size's CUDA graph captured (at the first prepare)

    # -- Engine --------------------------------------------------------------

    def describe(self) -> dict:
        """``{"engine": "wav2lip", "checkpoint", "version": "<layout>-<sha256 prefix>", "device", ...}``.

        Also ``precision``, ``backend``, ``mouth_only`` and, once int8 has been
        built, ``int8_error`` (mean absolute difference from fp32 on held-out
        speech-like input, in 1/255 of the generated face).
        """
        info = {
            "engine": self.name,
            "checkpoint": self._info["name"],
            "version": f"{self._info['layout']}-{self._info['sha256']}",
            "device": self.device.type,
            "precision": self.precision,
            "backend": self.backend,
            "mouth_only": self.mouth_only,
        }
        if self._ort is not None and self._ort.error is not None:
            info["int8_error"] = round(self._ort.error, 3)
        return info

    def prepare(self, image: np.ndarray, box: FaceBox, landmarks: Landmarks | None = None) -> PreparedAvatar:
        """Crop, model input and face features for ``image`` (H, W, 3) uint8 BGR.

        The region is ``box`` padded by the spec's (top 0, bottom 10, left 0,
        right 0) pixels and clipped to the image. Raises ``InvalidInputError``
        for a non-BGR image and ``NoFaceError`` when the box holds no pixels.
        The first avatar prepared on the onnxruntime back end also builds
        (exports, and for int8 quantises) the decoder: seconds, once.
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = getattr(image, "shape", None)
            raise InvalidInputError(f"the avatar must be an (H, W, 3) uint8 BGR image, got {shape}")
        h, w = image.shape[:2]
        region = Region(box.x1 - PAD_LEFT, box.y1 - PAD_TOP, box.x2 + PAD_RIGHT, box.y2 + PAD_BOTTOM).clip(w, h)
        if region.width < 2 or region.height < 2:
            raise NoFaceError(f"the face box {box.as_list()} lies outside the {w}x{h} avatar")
        face = _face96(image[region.y1:region.y2, region.x1:region.x2])
        faces = torch.from_numpy(_face_input(face).transpose(2, 0, 1)[None].copy())
        faces = faces.to(self.device, self._dtype).contiguous(memory_format=self._memory_format)
        features = None
        constants: tuple = ()
        top = None
        if self._eager:
            def encode() -> tuple:
                features = tuple(self._model.encode_faces(faces))
                if self.backend == "onnxruntime":
                    cpu_constants = self._decoder.constants([f.float() for f in features])
                    if self._ort is None:
                        self._build_ort(cpu_constants)
                if self.backend == "onnxruntime":
                    return features, tuple(self._ort.numpy_constants(cpu_constants))
                return features, tuple(c.contiguous(memory_format=self._memory_format)
                                       for c in self._decoder.constants(features))

            features, constants = self._thread.run(encode)
            if self.rows_from:
                top = torch.from_numpy(face[:self.rows_from].transpose(2, 0, 1)[None].astype(np.float32))
                top = top.to(self.device)
        state = _Wav2LipState(faces=faces, features=features, crop=face, constants=constants, top=top)
        if self._graphs is not None and not self._graphs_ready:
            self._capture_graphs(state)
        return PreparedAvatar(image=image, box=box, region=region, mask=paste_mask(image, box, region, landmarks),
                              state=state)

    def _capture_graphs(self, state: _Wav2LipState) -> None:
        """Capture the CUDA graph of every batch size a request can use, once, with the first
        avatar: a capture costs up to a second or two, which a request (or a live session's
        first sentences) must not wait for."""
        buckets = -(-self.batch_size // GRAPH_BUCKET)
        sizes = sorted({min(self.batch_size, k * GRAPH_BUCKET) for k in range(1, buckets + 1)})

        def capture() -> None:
            for size in sizes:
                self._graphs(torch.zeros(size, 1, 80, 16, device=self.device, dtype=self._dtype), state)
            torch.cuda.synchronize(self.device)

        self._thread.run(capture)
        self._graphs_ready = True

    def _build_ort(self, constants) -> None:
        """Export (and for int8 quantise and check) the decoder for ONNX Runtime; on the engine's thread.

        int8 whose self-check error is above ``int8_max_error`` is replaced by
        fp32. When the back end was chosen automatically and building fails,
        the engine falls back to PyTorch (logged) instead of failing.
        """
        try:  # onnxruntime itself is imported only here, when this back end is wanted
            self._ort = onnx_backend.OrtDecoder(self._decoder, constants, precision=self.precision)
        except Exception as exc:  # noqa: BLE001 - a broken optional runtime must not stop the service
            if not self._backend_chosen or self.precision == "int8":
                raise
            log.warning("onnxruntime back end unavailable (%s): using PyTorch", exc)
            self.backend = "torch"
            self._decoder = self._decoder.to(memory_format=self._memory_format)
            return
        if self.precision == "int8" and not self._ort.error <= self.int8_max_error:
            log.warning("int8 differs from fp32 by %.2f/255 on average (limit %.2f): using fp32",
                        self._ort.error, self.int8_max_error)
            error = self._ort.error
            self._ort = onnx_backend.OrtDecoder(self._decoder, constants, precision="fp32")
            self._ort.error = error
            self.precision = "fp32"

    @property
    def patch_device(self) -> torch.device | None:
        """Where ``render(..., on_device=True)`` leaves its patches: the GPU, when the engine
        runs there (None: patches are always NumPy arrays)."""
        return self.device if self.device.type == "cuda" and self._eager else None

    def render(self, avatar: PreparedAvatar, speech: Speech, fps: float,
               crops: Iterator[np.ndarray] | None = None, on_device: bool = False,
               order: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Yield (n, region.height, region.width, 3) uint8 BGR batches, one frame per mel window.

        Exactly ``audio.frame_count(len(speech.samples), fps)`` frames in all, or those
        ``order`` names, in its order (``Engine.render``).
        ``speech`` must be 16 kHz; raises ``InvalidInputError`` otherwise. With ``crops``
        (a video avatar) every frame's own face is the model's input, as in Wav2Lip's
        inference on a video: the whole model runs per frame (the face encoder too).
        ``on_device`` (with ``patch_device``): the batches are torch tensors left on the GPU.
        """
        state = avatar.state
        if not isinstance(state, _Wav2LipState):
            raise ValueError("this avatar was not prepared by a Wav2LipEngine")
        if speech.sample_rate != audio.SAMPLE_RATE:
            raise InvalidInputError(f"speech must be {audio.SAMPLE_RATE} Hz, got {speech.sample_rate} Hz")
        if not fps or fps <= 0:
            raise InvalidInputError(f"fps must be positive, got {fps}")
        samples = np.asarray(speech.samples, dtype=np.float32).reshape(-1)
        windows = audio.mel_windows(audio.melspectrogram(samples), fps)  # (N, 80, 16)
        expected = audio.frame_count(len(samples), fps)
        if len(windows) != expected:  # both come from the same mel length; guard the contract
            raise RuntimeError(f"mel windows ({len(windows)}) disagree with frame_count ({expected})")
        check_order(order, len(windows), crops)
        if order is not None:
            windows = windows[order]
        height, width = avatar.region.height, avatar.region.width
        on_gpu = crops is None and self.patch_device is not None
        if on_gpu:  # every window uploaded at once: one copy, no per-batch staging
            with torch.inference_mode():
                all_mel = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).unsqueeze(1)
                all_mel = all_mel.pin_memory().to(self.device, self._dtype, non_blocking=True)
        for start, stop in batches(len(windows), self.batch_size, first=GRAPH_BUCKET):
            chunk = windows[start:stop]
            if crops is not None:
                yield self._render_frames(chunk, [next(crops) for _ in chunk], height, width)
                continue
            if on_gpu:
                patches = self._render_cuda(all_mel[start:stop], state, height, width)
                yield patches if on_device else patches.cpu().numpy()
                continue
            faces96 = self._predict(chunk, state)  # (b, 96, 96, 3) float32 in [0, 255]
            out = np.empty((len(faces96), height, width, 3), dtype=np.uint8)
            for i, face in enumerate(faces96):
                resized = cv2.resize(face, (width, height), interpolation=cv2.INTER_CUBIC)
                np.clip(resized, 0, 255, out=resized)
                np.rint(resized, out=resized)
                out[i] = resized
            yield out

    # -- internals -----------------------------------------------------------

    def _predict(self, windows: np.ndarray, state: _Wav2LipState) -> np.ndarray:
        """(b, 80, 16) mel windows -> (b, 96, 96, 3) float32 BGR in [0, 255] (CPU)."""
        mel = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).unsqueeze(1)  # (b, 1, 80, 16)

        def decode() -> np.ndarray:
            if not self._eager:
                on_device = mel.to(self.device, self._dtype)
                pred = self._model(on_device, state.faces.expand(mel.size(0), -1, -1, -1))
            elif self._ort is not None:
                pred = torch.from_numpy(self._ort(mel.numpy(), state.constants))
            else:
                pred = self._decoder(mel.to(self.device, self._dtype), *state.constants)
            return (pred.float() * 255.0).permute(0, 2, 3, 1).cpu().numpy()

        pred = self._thread.run(decode)
        if not self.rows_from:
            return np.ascontiguousarray(pred)
        full = np.empty((len(pred), FACE_SIZE, FACE_SIZE, 3), np.float32)
        full[:, :self.rows_from] = state.crop[:self.rows_from]
        full[:, self.rows_from:] = pred
        return full

    def _render_frames(self, windows: np.ndarray, crops: list[np.ndarray], height: int, width: int) -> np.ndarray:
        """The whole model on each frame's own face: (b, 80, 16) mel windows and b region crops
        -> (b, height, width, 3) uint8 BGR."""
        count = len(crops)
        faces = np.stack([_face_input(crop) for crop in crops])  # (b, 96, 96, 6)
        faces_t = torch.from_numpy(faces.transpose(0, 3, 1, 2).copy())
        mel = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).unsqueeze(1)
        if self.device.type == "cuda":
            # Batches padded to a multiple of GRAPH_BUCKET: cuDNN tunes its kernels once per shape
            # (cudnn.benchmark), so a handful of shapes serve every request length.
            padded = -(-count // GRAPH_BUCKET) * GRAPH_BUCKET
            if padded > count:
                faces_t = torch.cat([faces_t, faces_t[-1:].expand(padded - count, -1, -1, -1)])
                mel = torch.cat([mel, mel[-1:].expand(padded - count, -1, -1, -1)])

        def run() -> np.ndarray:
            faces = faces_t.to(self.device, self._dtype).contiguous(memory_format=self._memory_format)
            pred = self._model(mel.to(self.device, self._dtype), faces)[:count].float() * 255.0
            return resize_faces_torch(pred, height, width).cpu().numpy()

        return self._thread.run(run)

    def _render_cuda(self, mel: torch.Tensor, state: _Wav2LipState, height: int, width: int) -> torch.Tensor:
        """CUDA: decode, resize, round and convert on the GPU: uint8 patches, still on the GPU.
        ``mel``: (b, 1, 80, 16) windows on the GPU in the engine's dtype."""
        count = len(mel)

        def run() -> torch.Tensor:
            if self._graphs is not None:
                # Pad to a multiple of GRAPH_BUCKET frames: a handful of graphs serve every request length.
                padded = min(self.batch_size, -(-count // GRAPH_BUCKET) * GRAPH_BUCKET)
                windows = torch.cat([mel, mel[-1:].expand(padded - count, -1, -1, -1)]) if padded > count else mel
                pred = self._graphs(windows, state)
            else:
                pred = self._decoder(mel, *state.constants)
            pred = pred[:count].float() * 255.0
            if self.rows_from:
                pred = torch.cat([state.top.expand(count, -1, -1, -1), pred], dim=2)
            return resize_faces_torch(pred, height, width)

        return self._thread.run(run)
