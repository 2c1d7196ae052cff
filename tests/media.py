"""ffprobe-like inspection of the MP4s we produce, through PyAV (libav in a wheel)."""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np


def probe(path) -> dict:
    """Streams, frame rate, frame count and durations of a media file (decodes every video frame)."""
    with av.open(str(path)) as container:
        info = {"format": container.format.name, "duration": container.duration / 1e6 if container.duration else None}
        video = next((s for s in container.streams if s.type == "video"), None)
        audio = next((s for s in container.streams if s.type == "audio"), None)
        if video is not None:
            info.update(video_codec=video.codec_context.name, pix_fmt=video.codec_context.pix_fmt,
                        width=video.codec_context.width, height=video.codec_context.height,
                        fps=Fraction(video.average_rate) if video.average_rate else None)
        if audio is not None:
            info.update(audio_codec=audio.codec_context.name, sample_rate=audio.codec_context.sample_rate,
                        audio_duration=float(audio.duration * audio.time_base) if audio.duration else None)
    if video is not None:
        info["frames"] = sum(1 for _ in decoded_frames(path))
        info["video_duration"] = info["frames"] / float(info["fps"])
    return info


def decoded_frames(path):
    """Every video frame as (H, W, 3) uint8 BGR."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="bgr24")


def decoded_audio(path, rate: int = 16000) -> np.ndarray:
    """The audio track as mono float32 at ``rate`` Hz."""
    out = []
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in container.decode(audio=0):
            for f in resampler.resample(frame):
                out.append(f.to_ndarray().reshape(-1))
        for f in resampler.resample(None):
            out.append(f.to_ndarray().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def moov_before_mdat(path) -> bool:
    """True when the MP4 index comes first (``-movflags +faststart``): browsers can play while downloading."""
    data = open(path, "rb").read()
    return 0 <= data.find(b"moov") < data.find(b"mdat")


def probe_rate(path) -> Fraction:
    """The video stream's frame rate."""
    with av.open(str(path)) as container:
        return Fraction(container.streams.video[0].average_rate)


# ---------------------------------------------------------------- the mouth, seen from outside


def dark_opening(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Pixels that turned into the dark inside of a mouth."""
    g0 = cv2.cvtColor(before, cv2.COLOR_BGR2GRAY).astype(np.float32)
    g1 = cv2.cvtColor(after, cv2.COLOR_BGR2GRAY).astype(np.float32)
    return (g0 - g1 > 30) & (g1 < 0.6 * np.median(g0))


def mouth_figures(video, avatar_bgr: np.ndarray) -> tuple[float, float]:
    """(r, opening) of an MP4, from its pixels and its own sound track.

    opening: 90th percentile over loud frames of the dark mouth opening's height at
    the mouth's centre (the median over its middle half), as a fraction of the mouth's
    width, minus the same over quiet frames; r: the best correlation of that height
    with the frame loudness, the mouth leading or trailing by up to 3 frames.
    """
    from lipsync.faces.landmarks import face_landmarks
    from lipsync.faces.locator import FaceLocator
    from lipsync.media.audio import frame_loudness

    frames = list(decoded_frames(video))
    pcm = decoded_audio(video)
    rms = frame_loudness(pcm, len(frames), float(probe_rate(video)))
    h, w = frames[0].shape[:2]
    ref = cv2.resize(avatar_bgr, (w, h), interpolation=cv2.INTER_AREA)
    box = FaceLocator(detector="haar").locate(ref)
    lm = face_landmarks(ref, box)
    left, right = lm.points[61], lm.points[291]
    width = float(np.linalg.norm(right - left))
    cx, cy = 0.5 * (left + right)
    x1, x2 = int(cx - 0.25 * width), int(cx + 0.25 * width)
    y1, y2 = int(cy - 0.3 * width), int(cy + 0.6 * width)
    heights = np.array([np.median(dark_opening(ref[y1:y2, x1:x2], f[y1:y2, x1:x2]).sum(axis=0)) / width
                        for f in frames])
    loud = rms > 0.1 * rms.max()
    opening = float(np.percentile(heights[loud], 90) - np.median(heights[~loud]))
    n = len(heights)
    r = max(np.corrcoef(heights[max(k, 0):n + min(k, 0)], rms[max(-k, 0):n - max(k, 0)])[0, 1]
            for k in range(-3, 4))
    return float(r), opening
