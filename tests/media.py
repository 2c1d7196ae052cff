"""ffprobe-like inspection of the MP4s we produce, through PyAV (libav in a wheel)."""

from __future__ import annotations

from fractions import Fraction

import av
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
