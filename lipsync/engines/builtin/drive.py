"""What the mouth does in every video frame: audio or phonemes -> mouth state.

The built-in engine animates two numbers per frame:

``open``  0 (lips together) .. 1 (wide open "a"): how far the lower lip and jaw drop.
``wide`` -1 (rounded "o"/"u"/"w", lips pushed together from the sides) ..
         +1 (spread "i"/"e", corners pulled apart); 0 is the relaxed mouth.

Two drivers produce them:

* ``track_from_audio``: any 16 kHz recording. A 100 Hz analysis of the
  speech-band level (against a noise-floor estimate, so hiss and clicks keep
  the mouth shut) gives how open; the spectral shape (the first-formant band
  against the low band, the second-formant band against the first, the
  fricative band) gives how open/rounded/spread within the speaker's own range.
  Attack/release smoothing makes shapes blend like real articulation.
* ``track_from_phonemes``: when the synthesiser reported its phoneme timeline
  (espeak-ng mnemonics). How far the jaw drops follows the sound, as for a
  recording (the marks are often tens of ms off the audio, and a loud frame
  with a shut mouth reads as out of sync); the phonemes give the shape: every
  phoneme has a viseme target and a dominance (Cohen-Massaro style
  coarticulation: vowels and lip-shaping consonants such as f/v/w/sh impose
  their shape, weak ones such as t/k take the shape of the vowels around
  them), so an "a" opens wider than an "i" and o/u round the lips. Bilabials
  (m/p/b) close the lips completely over their closure, found in the audio
  (a stop's silent closure usually precedes its marked burst), and at least
  one frame shows them shut; vowels of 80 ms or more are held open for at
  least 3 frames.

``mouth_track(speech, fps)`` picks the phoneme driver when phonemes are present.
All functions are pure: no state is kept between calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lipsync.engines.blend import smoothstep
from lipsync.media.audio import frame_count
from lipsync.tts.base import PhonemeEvent, Speech

ANALYSIS_RATE = 100.0  # feature frames per second (10 ms hop)
WINDOW_S = 0.025       # analysis window
LEAD_S = 0.02          # the mouth moves slightly before the sound it makes
OPEN_CURVE = 0.75      # phoneme driver: openness ** this (lifts small openings)
PEAK_WEIGHT = 0.5      # phoneme driver: a frame shows its mean opening moved this far to its peak


@dataclass(frozen=True)
class MouthTrack:
    """Per-frame mouth state: ``open`` in [0, 1], ``wide`` in [-1, 1], both float32 (n,)."""

    open: np.ndarray
    wide: np.ndarray
    fps: float
    source: str  # "audio", "phonemes" or "silence"

    def __len__(self) -> int:
        return int(self.open.shape[0])


# --------------------------------------------------------------------------
# audio analysis


@dataclass(frozen=True)
class AudioFeatures:
    """100 Hz features of a recording (all float64 arrays of one length)."""

    times: np.ndarray     # centre of each analysis window, seconds
    level_db: np.ndarray  # speech-band (80-5000 Hz) power, dB
    f1_db: np.ndarray     # 550-1100 Hz over 150-550 Hz (high for open vowels)
    f2_db: np.ndarray     # 1400-3200 Hz over 500-1400 Hz (high spread, low rounded)
    fric_db: np.ndarray   # 3500-7500 Hz over 80-3500 Hz (sibilants, fricatives)


def _band_power(power: np.ndarray, freqs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    sel = (freqs >= lo) & (freqs < hi)
    return power[:, sel].sum(axis=1)


def audio_features(samples: np.ndarray, sr: int = 16000) -> AudioFeatures:
    """Short-time band energies of ``samples`` (float, mono) every 10 ms."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    hop = max(1, int(round(sr / ANALYSIS_RATE)))
    win = max(16, int(round(sr * WINDOW_S)))
    n_fft = 1 << int(np.ceil(np.log2(win)))
    n_frames = max(1, int(np.ceil(x.size / hop)))
    # Window k is centred on k*hop + hop/2.
    pad_left = win // 2 - hop // 2
    padded = np.pad(x, (max(0, pad_left), win + hop))
    if padded.size < (n_frames - 1) * hop + win:
        padded = np.pad(padded, (0, (n_frames - 1) * hop + win - padded.size))
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, win), strides=(padded.strides[0] * hop, padded.strides[0]))
    window = np.hanning(win)
    spec = np.fft.rfft(frames * window, n=n_fft, axis=1)
    power = (spec.real ** 2 + spec.imag ** 2) / (np.sum(window ** 2) * n_fft)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    tiny = 1e-12

    def db(p):
        return 10.0 * np.log10(p + tiny)

    speech = _band_power(power, freqs, 80, 5000)
    low = _band_power(power, freqs, 150, 550)
    f1 = _band_power(power, freqs, 550, 1100)
    mid = _band_power(power, freqs, 500, 1400)
    f2 = _band_power(power, freqs, 1400, 3200)
    fric = _band_power(power, freqs, 3500, min(7500, sr / 2))
    body = _band_power(power, freqs, 80, 3500)
    times = (np.arange(n_frames) * hop + hop / 2.0) / sr
    return AudioFeatures(times=times, level_db=db(speech), f1_db=db(f1) - db(low),
                         f2_db=db(f2) - db(mid), fric_db=db(fric) - db(body))


@dataclass(frozen=True)
class Loudness:
    """Per-recording level calibration."""

    peak_db: float   # typical loud-vowel level
    floor_db: float  # background (noise floor) level
    gate_db: float   # below this the mouth stays shut


def loudness(level_db: np.ndarray) -> Loudness:
    """Noise floor, speech peak and gate of a level track (dB)."""
    level = np.asarray(level_db, dtype=np.float64)
    top = float(level.max()) if level.size else -120.0
    live = level[level > top - 60.0]
    peak = float(np.percentile(live, 90)) if live.size else top
    floor = float(np.percentile(level, 10)) if level.size else -120.0
    # The gate sits a few dB above the floor, but never closer to the peak than
    # 26 dB (continuous speech without pauses) nor further than 45 dB (digital
    # silence has no floor worth the name).
    gate = float(np.clip(floor + 8.0, peak - 45.0, peak - 26.0))
    return Loudness(peak_db=peak, floor_db=floor, gate_db=gate)


def attack_release(x: np.ndarray, rate: float, attack_s: float, release_s: float) -> np.ndarray:
    """One-pole follower: rises with time constant ``attack_s``, falls with ``release_s``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    if x.size == 0:
        return out
    a_up = 1.0 - np.exp(-1.0 / (rate * max(attack_s, 1e-6)))
    a_dn = 1.0 - np.exp(-1.0 / (rate * max(release_s, 1e-6)))
    y = 0.0
    for i, v in enumerate(x.tolist()):
        y += (a_up if v > y else a_dn) * (v - y)
        out[i] = y
    return out


def smooth_both_ways(x: np.ndarray, rate: float, tau_s: float) -> np.ndarray:
    """Zero-phase exponential smoothing (forward then backward)."""
    fwd = attack_release(x, rate, tau_s, tau_s)
    return attack_release(fwd[::-1], rate, tau_s, tau_s)[::-1]


def _to_frames(values: np.ndarray, times: np.ndarray, n_frames: int, fps: float,
               peak: float = 0.0) -> np.ndarray:
    """A 100 Hz track over each video frame's interval (shifted by LEAD_S): its mean,
    moved ``peak`` of the way towards its maximum (a still frame of a short vowel
    shows the vowel, not the average of it and the closures around it)."""
    if n_frames <= 0:
        return np.zeros(0, np.float32)
    # Sample densely (4 points per frame): a box filter of one frame.
    offsets = (np.arange(4) + 0.5) / 4.0
    t = (np.arange(n_frames)[:, None] + offsets[None, :]) / fps + LEAD_S
    v = np.interp(t.ravel(), times, values, left=values[0] if values.size else 0.0,
                  right=0.0).reshape(n_frames, 4)
    return ((1.0 - peak) * v.mean(axis=1) + peak * v.max(axis=1)).astype(np.float32)


def _zscore(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.sum() < 1e-6:
        return np.zeros_like(x)
    mean = float((x * w).sum() / w.sum())
    std = float(np.sqrt(((x - mean) ** 2 * w).sum() / w.sum()))
    return (x - mean) / max(std, 1.0)


def audio_envelope(feats: AudioFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(times, activity in [0, 1]) at 100 Hz of ``audio_features``: 0 at/below the gate,
    1 at the speech peak.

    The mapping is linear in dB above the gate, then squared so weak
    consonants open the mouth much less than vowels.
    """
    cal = loudness(feats.level_db)
    span = max(cal.peak_db - cal.gate_db, 6.0)
    # Openness grows over the top 30 dB below the peak; the gate removes noise.
    lin = np.clip((feats.level_db - (cal.peak_db - min(30.0, span))) / min(30.0, span), 0.0, 1.0)
    gate = smoothstep(cal.gate_db, cal.gate_db + 6.0, feats.level_db)
    return feats.times, (lin ** 1.5) * gate


def _audio_openness(feats: AudioFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(times, openness in [0, 1], wide in [-1, 1]) at 100 Hz from the sound alone (its
    ``audio_features``), or None when nothing rises above the noise gate. Not yet smoothed in time."""
    times, energy = audio_envelope(feats)
    if not np.any(energy > 0):
        return None
    weight = energy
    z1 = np.tanh(_zscore(feats.f1_db, weight) / 1.5)      # +: open vowel
    z2 = np.tanh(_zscore(feats.f2_db, weight) / 1.5)      # +: spread, -: rounded
    zf = smoothstep(-2.0, 8.0, feats.fric_db - np.average(feats.fric_db, weights=weight + 1e-9))
    # Syllable nuclei: the level against its running maximum over about a
    # syllable, so the jaw also closes between syllables of loud speech.
    level = smooth_both_ways(feats.level_db, ANALYSIS_RATE, 0.012)
    k = 15  # +-150 ms
    padded = np.pad(level, k, mode="edge")
    local_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1).max(axis=1)
    nucleus = np.clip(1.0 - (local_max - level) / 14.0, 0.0, 1.0)
    openness = energy * (0.75 + 0.25 * z1) * (1.0 - 0.45 * zf) * (0.5 + 0.5 * nucleus)
    # The speaker's loudest open vowels reach 0.9 (gain at most 1.8).
    voiced = energy > 0.05
    typical = float(np.percentile(openness[voiced], 95)) if np.any(voiced) else 1.0
    openness = np.clip(openness * (0.9 / max(typical, 0.5)), 0.0, 1.0)
    wide = np.clip((0.7 * z2 + 0.25 * zf) * smoothstep(0.02, 0.25, energy), -1.0, 1.0)
    return times, openness, wide


def track_from_audio(samples: np.ndarray, fps: float, sr: int = 16000,
                     n_frames: int | None = None) -> MouthTrack:
    """Mouth state from the sound alone (recordings, remote TTS)."""
    if n_frames is None:
        n_frames = frame_count(len(samples), fps)
    found = _audio_openness(audio_features(samples, sr))
    if found is None:
        return _silent(n_frames, fps)
    times, openness, wide = found
    openness = attack_release(openness, ANALYSIS_RATE, 0.02, 0.04)
    wide = smooth_both_ways(wide, ANALYSIS_RATE, 0.04)
    o = _to_frames(openness, times, n_frames, fps)
    w = _to_frames(wide, times, n_frames, fps)
    # Frames whose whole interval is below the gate are shut exactly.
    o[o < 0.02] = 0.0
    w[o == 0.0] = 0.0
    return MouthTrack(open=np.clip(o, 0, 1), wide=np.clip(w, -1, 1), fps=float(fps), source="audio")


def _silent(n_frames: int, fps: float) -> MouthTrack:
    z = np.zeros(max(0, n_frames), np.float32)
    return MouthTrack(open=z, wide=z.copy(), fps=float(fps), source="silence")


# --------------------------------------------------------------------------
# phonemes -> visemes


@dataclass(frozen=True)
class Viseme:
    """Target mouth shape of a phoneme and how strongly it imposes it."""

    open: float
    wide: float
    dominance: float  # for ``open``; bilabials dominate everything
    wide_dominance: float
    closes: bool = False  # lips must meet (m, p, b)


_PAUSE = Viseme(0.0, 0.0, 2.0, 1.0)
_V = Viseme
# espeak-ng mnemonics (en, ru, kk share most of them). Keys are looked up
# whole first, then by their first two and first characters.
VISEMES: dict[str, Viseme] = {
    # bilabials: lips together
    # (their "open" dominance is low: the closure itself is imposed separately,
    # so the vowels around them keep their full opening right up to it)
    "p": _V(0.0, 0.0, 0.3, 0.4, True), "b": _V(0.0, 0.0, 0.3, 0.4, True),
    "m": _V(0.0, 0.0, 0.3, 0.4, True),
    # labiodentals: lower lip tucked under the upper teeth
    "f": _V(0.07, 0.15, 2.5, 0.5), "v": _V(0.08, 0.15, 2.5, 0.5),
    # rounded glide
    "w": _V(0.12, -0.95, 2.0, 2.5), "W": _V(0.12, -0.95, 2.0, 2.5),
    # postalveolar fricatives/affricates: lips protruded and a little open
    "S": _V(0.2, -0.55, 1.5, 1.5), "Z": _V(0.2, -0.55, 1.5, 1.5),
    "tS": _V(0.18, -0.5, 1.5, 1.5), "dZ": _V(0.18, -0.5, 1.5, 1.5),
    "S;": _V(0.2, -0.4, 1.5, 1.2), "tS;": _V(0.18, -0.4, 1.5, 1.2),
    # sibilants: teeth close, lips slightly spread
    "s": _V(0.14, 0.45, 1.3, 0.8), "z": _V(0.14, 0.45, 1.3, 0.8), "ts": _V(0.14, 0.4, 1.3, 0.8),
    # dental fricatives: tongue between the teeth
    "T": _V(0.22, 0.2, 1.0, 0.4), "D": _V(0.22, 0.2, 1.0, 0.4),
    # alveolars, velars, glottals: the jaw follows the neighbours
    "t": _V(0.25, 0.15, 0.35, 0.2), "d": _V(0.25, 0.15, 0.35, 0.2),
    "n": _V(0.22, 0.1, 0.35, 0.2), "l": _V(0.28, 0.1, 0.3, 0.2),
    "r": _V(0.28, -0.1, 0.3, 0.3), "R": _V(0.28, -0.1, 0.3, 0.3),
    "k": _V(0.3, 0.0, 0.3, 0.15), "g": _V(0.3, 0.0, 0.3, 0.15), "N": _V(0.25, 0.0, 0.3, 0.15),
    "x": _V(0.3, 0.0, 0.3, 0.15), "h": _V(0.35, 0.0, 0.2, 0.1), "q": _V(0.3, 0.0, 0.3, 0.15),
    "G": _V(0.3, 0.0, 0.3, 0.15), "j": _V(0.25, 0.55, 0.4, 0.6), "?": _V(0.2, 0.0, 0.3, 0.1),
    # vowels
    "a": _V(1.0, 0.15, 1.0, 0.6), "A": _V(0.95, 0.0, 1.0, 0.6), "a#": _V(0.85, 0.1, 1.0, 0.6),
    "aI": _V(0.9, 0.3, 1.0, 0.6), "aU": _V(0.85, -0.3, 1.0, 0.6), "V": _V(0.75, 0.05, 1.0, 0.6),
    "0": _V(0.8, -0.45, 1.0, 0.8),
    "o": _V(0.6, -0.7, 1.0, 1.0), "O": _V(0.7, -0.55, 1.0, 1.0), "oU": _V(0.55, -0.75, 1.0, 1.0),
    "OI": _V(0.65, -0.4, 1.0, 0.8), "Y": _V(0.45, -0.6, 1.0, 1.0),
    "8": _V(0.5, -0.7, 1.0, 1.0),  # Kazakh ө
    "u": _V(0.35, -0.95, 1.0, 1.4), "U": _V(0.4, -0.75, 1.0, 1.2),
    "@": _V(0.45, 0.0, 0.5, 0.3), "3": _V(0.5, -0.1, 0.8, 0.4), "@L": _V(0.4, 0.0, 0.5, 0.3),
    "e": _V(0.65, 0.55, 1.0, 0.8), "E": _V(0.75, 0.45, 1.0, 0.8), "eI": _V(0.6, 0.6, 1.0, 0.8),
    "e@": _V(0.7, 0.4, 1.0, 0.8), "&": _V(0.85, 0.45, 1.0, 0.8),
    "i": _V(0.32, 0.85, 1.0, 1.0), "I": _V(0.38, 0.7, 1.0, 0.9), "I#": _V(0.38, 0.6, 1.0, 0.8),
    "y": _V(0.35, 0.45, 1.0, 0.8), "i@": _V(0.45, 0.6, 1.0, 0.8), "U@": _V(0.45, -0.75, 1.0, 1.3),
}
_DEFAULT = _V(0.3, 0.0, 0.3, 0.2)
# Vowel mnemonics start with one of these (espeak-ng en, ru, kk): the sounds whose
# opening is held for their whole duration.
_VOWEL_STARTS = set("aAeEiIoOuUV03@&yY8")
HOLD_MIN_S = 0.08      # a vowel this long or longer stays open for >= HOLD_FRAMES frames
HOLD_FRAMES = 3
HOLD_LEVEL = 0.7       # ... at no less than this fraction of its own peak
_STRIP = "'\",;:%=!^~-+012345678"


def viseme(phoneme: str) -> Viseme:
    """The viseme of one espeak-ng phoneme mnemonic (pauses start with "_")."""
    p = (phoneme or "").strip()
    if not p or p.startswith("_") or p in ("||", "|", "#"):
        return _PAUSE
    if p in VISEMES:
        return VISEMES[p]
    core = "".join(ch for ch in p if ch not in _STRIP)
    if core in VISEMES:
        return VISEMES[core]
    for key in (core[:2], core[:1], p[:2], p[:1]):
        if key and key in VISEMES:
            return VISEMES[key]
    return _DEFAULT


def is_vowel(phoneme: str) -> bool:
    """True for an espeak-ng vowel mnemonic ("a", "A:", "a#", "oU", "u#", "@-", ...)."""
    core = "".join(ch for ch in (phoneme or "").strip() if ch not in _STRIP)
    return bool(core) and core[0] in _VOWEL_STARTS


def _dominance_blend(events: Sequence[tuple[float, float, Viseme]], t: np.ndarray,
                     which: str) -> np.ndarray:
    """Cohen-Massaro coarticulation: sum(D_k T_k) / sum(D_k) at times ``t``."""
    num = np.zeros_like(t)
    den = np.full_like(t, 1e-6)
    reach = 0.6  # s; tails are below 1e-4 of the peak further away
    for start, end, v in events:
        target = v.open if which == "open" else v.wide
        dom = v.dominance if which == "open" else v.wide_dominance
        i0, i1 = np.searchsorted(t, [start - reach, end + reach])
        if i1 <= i0:
            continue
        tt = t[i0:i1]
        # Full dominance inside the segment, exponential tails outside it.
        # Anticipation (before) reaches further than carry-over (after).
        before = np.clip(start - tt, 0.0, None)
        after = np.clip(tt - end, 0.0, None)
        tau_b, tau_a = (0.035, 0.03) if v.closes else (0.06, 0.045)
        d = dom * np.exp(-before / tau_b - after / tau_a)
        num[i0:i1] += d * target
        den[i0:i1] += d
    return num / den


_MODIFIERS = {";", "'", ":", "-", "#", ","}


def _merge_modifiers(phonemes: Sequence[PhonemeEvent]) -> list[tuple[float, float, str]]:
    """(start, end, phoneme) with stand-alone modifiers (";" palatalisation) merged
    into the phoneme before them."""
    out: list[tuple[float, float, str]] = []
    for e in sorted(phonemes, key=lambda e: (e.start, e.end)):
        name = (e.phoneme or "").strip()
        if out and (not name or all(ch in _MODIFIERS for ch in name)):
            s0, _, n0 = out[-1]
            out[-1] = (s0, max(float(e.end), out[-1][1]), n0)
            continue
        out.append((float(e.start), max(float(e.end), float(e.start) + 0.005), name))
    return out


def _quiet_run(lo: float, hi: float, anchor: float, times: np.ndarray, level_db: np.ndarray,
               drop_db: float) -> tuple[float, float] | None:
    """The stretch of [lo, hi] at least ``drop_db`` below the loudest sound
    around it that lies closest to ``anchor``, or None."""
    i0 = int(np.searchsorted(times, lo, side="left"))
    i1 = int(np.searchsorted(times, hi, side="right"))
    if i1 - i0 < 2:
        return None
    a0, a1 = np.searchsorted(times, [lo - 0.08, hi + 0.1])
    ref = float(level_db[a0:max(a1, a0 + 1)].max())
    quiet = level_db[i0:i1] < ref - drop_db
    if not quiet.any():
        return None
    ts = times[i0:i1]
    idx = np.flatnonzero(quiet)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)

    def distance(r):
        a, b = ts[r[0]], ts[r[-1]]
        return 0.0 if a <= anchor <= b else min(abs(a - anchor), abs(b - anchor))

    best = min(runs, key=lambda r: (distance(r), -len(r)))
    return float(ts[best[0]]) - 0.005, float(ts[best[-1]]) + 0.005


def _closure_span(name: str, start: float, end: float, prev_start: float, times: np.ndarray,
                  level_db: np.ndarray) -> tuple[float, float]:
    """When the lips are actually together for a bilabial.

    Synthesisers mark a stop at its burst; the silent closure before it often
    falls inside the previous phoneme's span (espeak-ng does this for
    voiceless stops). So for p/b the closure is the quiet stretch of audio
    nearest to the marked start, searched from a little before it to its end;
    for m it is the quieter (nasal murmur) part of its own span.
    """
    if name.startswith("m"):
        run = _quiet_run(start - 0.015, end + 0.015, 0.5 * (start + end), times, level_db, 5.0)
        a, b = run if run is not None else (start + 0.15 * (end - start), end - 0.15 * (end - start))
        a, b = max(a, start - 0.015), min(b, end + 0.015)
    else:
        lo = max(start - 0.08, prev_start + 0.35 * max(0.0, start - prev_start))
        run = _quiet_run(lo, end, start, times, level_db, 10.0)
        a, b = run if run is not None else (start, start + max(0.04, 0.7 * (end - start)))
    if b - a < 0.035:
        c = 0.5 * (a + b)
        a, b = c - 0.0175, c + 0.0175
    return a, b


def track_from_phonemes(phonemes: Sequence[PhonemeEvent], samples: np.ndarray, fps: float,
                        sr: int = 16000, n_frames: int | None = None) -> MouthTrack:
    """Mouth state from the sound's level and the synthesiser's phoneme timeline (module doc)."""
    if n_frames is None:
        n_frames = frame_count(len(samples), fps)
    merged = _merge_modifiers(phonemes)
    if not merged:
        return track_from_audio(samples, fps, sr, n_frames)
    duration = max(len(samples) / float(sr), n_frames / float(fps))
    t = np.arange(int(np.ceil(duration * ANALYSIS_RATE)) + 1) / ANALYSIS_RATE
    feats = audio_features(samples, sr)
    events: list[tuple[float, float, Viseme]] = []
    closures: list[tuple[float, float]] = []
    for k, (s0, e0, name) in enumerate(merged):
        v = viseme(name)
        if v.closes:
            prev_start = merged[k - 1][0] if k else s0 - 0.1
            a, b = _closure_span(name, s0, e0, prev_start, feats.times, feats.level_db)
            closures.append((a, b))
            # The previous phoneme ends where the lips meet.
            if events and events[-1][1] > a and events[-1][0] < a:
                ps, _, pv = events[-1]
                events[-1] = (ps, a, pv)
            events.append((a, b, v))
            if b < e0 - 0.01:  # burst and aspiration: lips parting to the next sound
                events.append((b, e0, _DEFAULT))
        else:
            if events and s0 < events[-1][1]:
                s0 = min(events[-1][1], e0 - 0.005)
            events.append((s0, e0, v))
    # Silence before the first and after the last phoneme.
    first, last = min(s for s, _, _ in events), max(e for _, e, _ in events)
    events.append((-1.0, first, _PAUSE))
    events.append((last, duration + 1.0, _PAUSE))
    shape = _dominance_blend(events, t, "open")
    wide = _dominance_blend(events, t, "wide")
    # How far the mouth opens follows the sound (its loudness and spectrum, as for a
    # recording: a synthesiser's phoneme marks are often off by tens of ms, and a
    # loud frame with a shut mouth is what viewers see as "out of sync"); what shape
    # it takes comes from the phonemes: an "a" opens wider than an "i" at the same level.
    found = _audio_openness(feats)
    if found is None:
        loud = np.zeros_like(t)
    else:
        loud = np.interp(t, found[0], found[1], left=0.0, right=0.0)
    openness = loud * (0.65 + 0.4 * np.clip(shape, 0.0, 1.0))
    # Bilabials: the lips meet for the whole closure, whatever the neighbours do.
    closure = np.zeros_like(t)
    for a, b in closures:
        mid, half = 0.5 * (a + b), 0.5 * (b - a)
        i0, i1 = np.searchsorted(t, [a - 0.03, b + 0.03])
        if i1 > i0:
            closure[i0:i1] = np.maximum(closure[i0:i1], 1.0 - smoothstep(half, half + 0.02, np.abs(t[i0:i1] - mid)))
    openness = openness * (1.0 - closure)
    # Fast synthetic speech rarely reaches the loudness of its own peaks for long:
    # lift the utterance so its typical stressed vowel opens to 0.9 (gain <= 1.8).
    speaking = openness > 0.05
    if np.any(speaking):
        typical = float(np.percentile(openness[speaking], 95))
        openness = openness * (0.9 / max(typical, 0.5))
    # Unstressed syllables of synthetic speech open only a little; lifted on a
    # gentle curve (0.2 -> 0.3, 0.5 -> 0.6) they read as speech, not as a mumble.
    openness = np.clip(openness, 0.0, 1.0) ** OPEN_CURVE
    openness = attack_release(openness, ANALYSIS_RATE, 0.015, 0.03)
    wide = smooth_both_ways(wide, ANALYSIS_RATE, 0.025)
    o = _to_frames(openness, t, n_frames, fps, peak=PEAK_WEIGHT)
    w = _to_frames(wide, t, n_frames, fps)
    shut = np.zeros(n_frames, bool)
    # Every bilabial shows at least one frame with the lips together, however
    # short it is: the frame whose interval holds the middle of the closure.
    for a, b in closures:
        i = int(np.floor(0.5 * (a + b) * fps))
        if 0 <= i < n_frames:
            o[i] = 0.0
            shut[i] = True
    _hold_vowels(o, merged, fps, shut)
    o[o < 0.02] = 0.0
    w[o == 0.0] = 0.0
    return MouthTrack(open=np.clip(o, 0, 1), wide=np.clip(w, -1, 1), fps=float(fps), source="phonemes")


def _hold_vowels(o: np.ndarray, merged: Sequence[tuple[float, float, str]], fps: float,
                 shut: np.ndarray) -> None:
    """Keep every vowel of ``HOLD_MIN_S`` or longer open for at least ``HOLD_FRAMES``
    frames at ``HOLD_LEVEL`` of its peak (in place): the sound of a vowel dips and
    swells, the jaw does not flicker with it. Frames in ``shut`` (a bilabial's
    closure) stay shut; a short vowel borrows the frame before it (anticipation)."""
    n = o.shape[0]
    for start, end, name in merged:
        if end - start < HOLD_MIN_S or not is_vowel(name):
            continue
        i0 = int(np.floor((start - LEAD_S) * fps))
        i1 = int(np.ceil((end - LEAD_S) * fps))  # exclusive
        i0, i1 = max(0, i0), min(n, i1)
        if i1 <= i0:
            continue
        peak = float(o[i0:i1].max())
        if peak <= 0.05:
            continue
        while i1 - i0 < HOLD_FRAMES and (i0 > 0 or i1 < n):
            if i0 > 0 and not shut[i0 - 1]:
                i0 -= 1
            elif i1 < n and not shut[i1]:
                i1 += 1
            else:
                break
        span = slice(i0, i1)
        o[span] = np.where(shut[span], o[span], np.maximum(o[span], HOLD_LEVEL * peak))


def _usable(phonemes: Iterable[PhonemeEvent]) -> bool:
    return any(viseme(e.phoneme) is not _PAUSE for e in phonemes)


def mouth_track(speech: Speech, fps: float, n_frames: int | None = None) -> MouthTrack:
    """The mouth state for every frame of ``speech`` at ``fps``.

    Uses the phoneme timeline when ``speech.phonemes`` holds any phoneme,
    the audio otherwise. ``n_frames`` defaults to
    ``lipsync.media.audio.frame_count(len(speech.samples), fps)``.
    """
    samples = np.asarray(speech.samples, dtype=np.float32).ravel()
    if n_frames is None:
        n_frames = frame_count(samples.size, fps)
    if samples.size == 0:
        return _silent(n_frames, fps)
    if speech.phonemes and _usable(speech.phonemes):
        return track_from_phonemes(speech.phonemes, samples, fps, speech.sample_rate, n_frames)
    return track_from_audio(samples, fps, speech.sample_rate, n_frames)
