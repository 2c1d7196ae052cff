"""The built-in engine on the real fixtures: what a viewer would notice.

Every test composites the engine's patches onto the avatar itself
(out = mask*patch + (1-mask)*avatar, the shared compositor's formula) and
measures the result: does the mouth move with the speech, stay shut in
silence, close on m/p/b, leave the eyes and background alone, show no seam?
"""

from __future__ import annotations

import importlib.util
import threading

import cv2
import numpy as np
import pytest

from lipsync.engines.builtin.drive import mouth_track, viseme
from lipsync.engines.builtin.engine import FIRST_BATCH, BuiltinEngine
from lipsync.engines.builtin.mouth import locate_mouth
from lipsync.faces.box import FaceBox
from lipsync.media.audio import frame_count, load_audio
from lipsync.tts.base import PhonemeEvent, Speech
from tests.conftest import fixture_path, skip_or_fail

FPS = 25
SR = 16000
# Hand-marked face boxes (shared/fixtures/README.md) and where the lips meet,
# marked by eye on the photos: (x, y) of the middle of the lip line.
FACES = {
    "avatar.jpg": (FaceBox(420, 137, 885, 602), (655, 513)),
    "kennedy_low.jpg": (FaceBox(214, 122, 478, 386), (336, 329)),
    "mona_low.jpg": (FaceBox(406, 168, 762, 524), (584, 459)),
}


# ---------------------------------------------------------------- helpers


def composite_region(avatar, patch: np.ndarray) -> np.ndarray:
    """out = mask*patch + (1-mask)*avatar inside the region: all of ``composite`` that can differ
    from the avatar (outside the region ``composite`` is a copy of the avatar's pixels)."""
    r = avatar.region
    base = avatar.image[r.y1:r.y2, r.x1:r.x2].astype(np.float32)
    m = avatar.mask.astype(np.float32)
    return np.clip(m * patch.astype(np.float32) + (1 - m) * base + 0.5, 0, 255).astype(np.uint8)


def composite(avatar, patch: np.ndarray) -> np.ndarray:
    """out = mask*patch + (1-mask)*avatar, pasted into a copy of the avatar image."""
    r = avatar.region
    out = avatar.image.copy()
    out[r.y1:r.y2, r.x1:r.x2] = composite_region(avatar, patch)
    return out


def render_all(engine, avatar, speech, fps=FPS) -> np.ndarray:
    batches = list(engine.render(avatar, speech, fps))
    return np.concatenate(batches) if batches else np.zeros((0,), np.uint8)


def mouth_box(avatar) -> tuple[int, int, int, int]:
    """The mouth and the skin just around it: where lip motion shows."""
    g = avatar.state.geometry
    bh = avatar.box.height
    return (int(g.cx - 1.3 * g.half_width), int(g.cy - g.upper - 0.02 * bh),
            int(g.cx + 1.3 * g.half_width), int(g.cy + g.lower + 0.1 * bh))


def motion_energy(avatar, frames: np.ndarray) -> np.ndarray:
    """Mean abs difference between each composited frame and the avatar in the mouth box."""
    x1, y1, x2, y2 = mouth_box(avatar)
    ref = avatar.image[y1:y2, x1:x2].astype(np.float32)
    # composite(avatar, f)[y1:y2, x1:x2] for each f, computed only where the mouth box meets the region
    # (outside the region the composite is the avatar): the same pixels, per pixel the same formula
    r = avatar.region
    out = avatar.image[y1:y2, x1:x2].copy()
    ix1, iy1, ix2, iy2 = max(x1, r.x1), max(y1, r.y1), min(x2, r.x2), min(y2, r.y2)
    inside = (slice(iy1 - r.y1, iy2 - r.y1), slice(ix1 - r.x1, ix2 - r.x1))
    m = avatar.mask.astype(np.float32)[inside]
    base = avatar.image[r.y1:r.y2, r.x1:r.x2].astype(np.float32)[inside]
    energy = []
    for f in frames:
        if ix1 < ix2 and iy1 < iy2:
            out[iy1 - y1:iy2 - y1, ix1 - x1:ix2 - x1] = np.clip(
                m * f[inside].astype(np.float32) + (1 - m) * base + 0.5, 0, 255).astype(np.uint8)
        energy.append(np.abs(out.astype(np.float32) - ref).mean())
    return np.array(energy)


def frame_rms(samples: np.ndarray, n: int, fps=FPS) -> np.ndarray:
    """RMS of the audio inside each frame's interval: the speech envelope."""
    step = SR / fps
    return np.array([np.sqrt(np.mean(np.square(samples[int(i * step):int((i + 1) * step)]) + 0.0))
                     if int(i * step) < samples.size else 0.0 for i in range(n)])


def smooth3(x: np.ndarray) -> np.ndarray:
    return np.convolve(x, np.ones(3) / 3.0, mode="same")


def load_face(name):
    image = cv2.imread(str(fixture_path(name)), cv2.IMREAD_COLOR)
    assert image is not None
    box, lips = FACES[name]
    return image, box, lips


@pytest.fixture(scope="module")
def engine():
    return BuiltinEngine()


@pytest.fixture(scope="module")
def speech():
    return Speech(load_audio(str(fixture_path("kennedy_speech_16k.wav"))))


@pytest.fixture(scope="module")
def prepared(engine):
    out = {}
    for name in FACES:
        image, box, _ = load_face(name)
        out[name] = engine.prepare(image, box)
    return out


@pytest.fixture(scope="module")
def rendered(engine, prepared, speech):
    return {name: render_all(engine, av, speech) for name, av in prepared.items()}


def espeak_or_skip():
    if importlib.util.find_spec("lipsync.tts.espeak") is None:
        skip_or_fail("lipsync.tts.espeak is not written yet")
    from lipsync.tts.espeak import EspeakTTS
    try:
        return EspeakTTS()
    except Exception as exc:  # noqa: BLE001 - the library or voice data missing on this machine
        skip_or_fail(f"espeak-ng unavailable: {exc}")


# ---------------------------------------------------------------- contract


def test_describe_reports_a_weightless_cpu_engine(engine):
    d = engine.describe()
    assert d["engine"] == "builtin" == engine.name
    assert d["checkpoint"] is None and d["device"] == "cpu" and d["version"]


@pytest.mark.parametrize("fps", [25, 30])
def test_render_yields_exactly_frame_count_region_patches(engine, prepared, speech, fps):
    av = prepared["avatar.jpg"]
    sizes = []
    for batch in engine.render(av, speech, fps):
        assert batch.dtype == np.uint8 and batch.ndim == 4
        assert batch.shape[1:] == (av.region.height, av.region.width, 3)
        sizes.append(batch.shape[0])
    assert sum(sizes) == frame_count(len(speech.samples), fps)
    assert sizes[0] == FIRST_BATCH < sizes[1]  # the first frames go to the encoder (a stream) sooner
    assert av.mask.shape == (av.region.height, av.region.width, 1) and av.mask.dtype == np.float32
    assert 0.0 <= av.mask.min() and av.mask.max() <= 1.0


def test_tiny_speech_still_gives_frame_count_frames(engine, prepared):
    av = prepared["kennedy_low.jpg"]
    for n in (0, 1, 199, 200, 3201):
        sp = Speech(np.zeros(n, np.float32))
        frames = render_all(engine, av, sp)
        assert len(frames) == frame_count(n, FPS)


# ---------------------------------------------------------------- mouth localisation


@pytest.mark.parametrize("name", list(FACES))
def test_mouth_is_found_on_the_lips(name):
    image, box, (lx, ly) = load_face(name)
    g = locate_mouth(image, box)
    assert g.method == "analysis", "the lips should be found by image analysis, not the prior"
    assert abs(g.cx - lx) < 0.04 * box.width
    assert abs(g.cy - ly) < 0.03 * box.height
    # Mouth width on these faces is about 0.25-0.32 of the box width.
    assert 0.2 * box.width < 2 * g.half_width < 0.4 * box.width


@pytest.mark.parametrize("name", list(FACES))
def test_mouth_is_found_even_when_the_face_box_is_off(name):
    """Detectors land within ~15 % of the hand boxes: the lips must still be found."""
    image, box, (lx, ly) = load_face(name)
    for dx, dy, scale in [(0.08, 0, 1), (-0.08, 0, 1), (0, 0.08, 1), (0, -0.08, 1),
                          (0, 0, 0.9), (0, 0, 1.12), (0.06, 0.06, 1.08), (-0.06, -0.06, 0.92)]:
        cx, cy = (box.x1 + box.x2) / 2 + dx * box.width, (box.y1 + box.y2) / 2 + dy * box.height
        w, h = box.width * scale, box.height * scale
        off = FaceBox(int(cx - w / 2), int(cy - h / 2), int(cx + w / 2), int(cy + h / 2))
        g = locate_mouth(image, off)
        assert g.method == "analysis", (dx, dy, scale)
        assert abs(g.cx - lx) < 0.04 * box.width and abs(g.cy - ly) < 0.03 * box.height, (dx, dy, scale)


def test_featureless_face_falls_back_to_the_geometric_prior(engine):
    image = np.full((400, 400, 3), 150, np.uint8)
    box = FaceBox(100, 80, 300, 300)
    av = engine.prepare(image, box)
    assert av.state.geometry.method == "prior"
    sp = Speech((0.3 * np.sin(np.arange(SR) * 2 * np.pi * 150 / SR)).astype(np.float32))
    frames = render_all(engine, av, sp)
    assert len(frames) == frame_count(SR, FPS)
    assert max(np.abs(f.astype(int) - av.image[av.region.y1:av.region.y2, av.region.x1:av.region.x2]).max()
               for f in frames) > 30, "even without lips found, a tone should open the mouth"


# ---------------------------------------------------------------- following the speech


@pytest.mark.parametrize("name", list(FACES))
def test_mouth_motion_follows_the_speech_envelope(prepared, rendered, speech, name):
    av = prepared[name]
    energy = motion_energy(av, rendered[name])
    env = frame_rms(speech.samples, len(energy))
    r = np.corrcoef(smooth3(energy), smooth3(env))[0, 1]
    assert r >= 0.6, f"motion/envelope correlation {r:.2f} on {name}"
    # And the mouth moves visibly during speech (several grey levels on average).
    speaking = env > 0.3 * env.max()
    assert energy[speaking].mean() > 4.0


def test_mouth_stays_closed_in_the_leading_silence(prepared, rendered):
    n_silent = int(1.5 * FPS)  # frames wholly inside the first 1.5 s
    for name, av in prepared.items():
        r = av.region
        avatar_region = av.image[r.y1:r.y2, r.x1:r.x2].astype(int)  # outside it the composite is the avatar
        for f in rendered[name][:n_silent]:
            diff = np.abs(composite_region(av, f).astype(int) - avatar_region)
            assert diff.max() <= 1, f"{name}: the mouth moved during silence"


def test_background_hiss_does_not_open_the_mouth(engine, prepared, speech):
    rng = np.random.default_rng(0)
    noisy = speech.samples + rng.normal(0, 0.004, speech.samples.size).astype(np.float32)  # about -48 dBFS
    av = prepared["avatar.jpg"]
    frames = render_all(engine, av, Speech(noisy))
    energy = motion_energy(av, frames)
    assert energy[: int(1.5 * FPS)].max() <= 0.05, "hiss alone opened the mouth"
    env = frame_rms(speech.samples, len(energy))
    assert np.corrcoef(smooth3(energy), smooth3(env))[0, 1] >= 0.6


def test_eyes_and_everything_outside_the_lower_face_never_change(prepared, rendered):
    for name, av in prepared.items():
        box = av.box
        frames = rendered[name]
        changed = np.zeros(av.image.shape[:2], bool)
        r = av.region
        avatar_region = av.image[r.y1:r.y2, r.x1:r.x2]
        for f in frames[:: 2]:  # only the region of a composite can differ from the avatar (a copy outside)
            changed[r.y1:r.y2, r.x1:r.x2] |= np.any(composite_region(av, f) != avatar_region, axis=2)
        assert changed.any(), f"{name}: nothing moved at all"
        ys, xs = np.nonzero(changed)
        g = av.state.geometry
        # Eyes (and the whole upper face down to the nose tip) untouched.
        assert ys.min() > box.y1 + 0.62 * box.height, f"{name}: pixels changed above the nose"
        # Nothing outside the face's width, nothing far below the chin.
        assert xs.min() >= box.x1 and xs.max() < box.x2, f"{name}: pixels changed beside the face"
        assert ys.max() < box.y2 + 0.25 * box.height
        assert ys.min() > g.cy - g.upper - 0.2 * box.height


def test_no_seam_at_the_border_of_the_redrawn_region(prepared, rendered, speech):
    for name, av in prepared.items():
        m = av.mask[..., 0]
        border = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
        assert border.max() < 1e-3, f"{name}: the mask is not zero on the region border"
        # Zero from the nose up (the nose starts ~0.11 box heights above the lips).
        g = av.state.geometry
        top_of_lips = min(y for _, y in g.profile) if g.profile else g.cy
        nose_rows = int(top_of_lips - 0.12 * av.box.height) - av.region.y1
        assert nose_rows <= 0 or m[:nose_rows].max() < 1e-3, f"{name}: the mask reaches the nose"
        frames = rendered[name]
        energy = motion_energy(av, frames)
        f = frames[int(np.argmax(energy))]  # the widest-open frame
        comp = composite(av, f).astype(np.int32)
        ref = av.image.astype(np.int32)
        r = av.region
        rc, rr = comp[r.y1:r.y2, r.x1:r.x2], ref[r.y1:r.y2, r.x1:r.x2]
        # Along the pasted rectangle: identical to the avatar.
        edge = np.zeros(m.shape, bool)
        edge[[0, -1], :] = True
        edge[:, [0, -1]] = True
        assert np.abs(rc - rr)[edge].max() <= 1
        # Where the mask is ~0, the avatar's own pixels (no flicker of "untouched" areas).
        assert np.abs(rc - rr)[m < 0.01].max() <= 1
        # Across the mask's 0.5 contour: no step larger than the image itself had there.
        inside = m >= 0.5
        grey_c = rc.mean(axis=2)
        grey_r = rr.mean(axis=2)
        local_step = cv2.dilate(np.maximum(
            np.pad(np.abs(np.diff(grey_r, axis=0)), ((0, 1), (0, 0))),
            np.pad(np.abs(np.diff(grey_r, axis=1)), ((0, 0), (0, 1)))).astype(np.float32),
            np.ones((5, 5), np.uint8))
        for axis in (0, 1):
            cross = np.diff(inside.astype(np.int8), axis=axis) != 0
            step = np.abs(np.diff(grey_c, axis=axis))[cross]
            allowed = (local_step[:-1, :] if axis == 0 else local_step[:, :-1])[cross]
            assert cross.any()
            assert np.all(step <= allowed + 3.0), f"{name}: a seam along the mask's 0.5 contour"


# ---------------------------------------------------------------- phonemes


def _voiced(duration: float, events, level=0.25) -> np.ndarray:
    """A buzzy 120 Hz voice, loud during vowels, quieter during consonants."""
    t = np.arange(int(duration * SR)) / SR
    buzz = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 25))
    amp = np.zeros_like(t)
    for e in events:
        v = viseme(e.phoneme)
        if v.dominance >= 2.0 and not v.closes:
            continue  # pause
        sel = (t >= e.start) & (t < e.end)
        amp[sel] = level * (0.15 if v.closes else (1.0 if v.open > 0.5 else 0.5))
    return (buzz / np.abs(buzz).max() * amp).astype(np.float32)


def _timeline(spec: str, start=0.3, dur=0.12) -> tuple[PhonemeEvent, ...]:
    events = []
    t = start
    for p in spec.split():
        d = dur * (0.8 if p in "mpb" else 1.0)
        events.append(PhonemeEvent(t, t + d, p))
        t += d
    return tuple(events)


def _open_at(avatar, frames, t: float) -> float:
    i = int(t * FPS)  # the frame on screen at time t
    return float(motion_energy(avatar, frames[i:i + 1])[0])


def test_hand_timeline_closes_lips_on_bilabials_and_opens_on_vowels(engine, prepared):
    events = _timeline("_: m a m a p a b a _: m o b i p a _:")
    samples = _voiced(events[-1].end + 0.3, events)
    sp = Speech(samples, phonemes=events)
    track = engine.track(sp, FPS)
    assert track.source == "phonemes"
    av = prepared["avatar.jpg"]
    frames = render_all(engine, av, sp)
    lab = [e for e in events if e.phoneme in ("m", "p", "b")]
    vow = [e for e in events if e.phoneme == "a"]
    closed = [_open_at(av, frames, (e.start + e.end) / 2) for e in lab]
    opened = [_open_at(av, frames, (e.start + e.end) / 2) for e in vow]
    assert max(closed) < 0.35 * min(opened), (closed, opened)
    # And in the model's own terms: lips together on every bilabial.
    for e in lab:
        assert track.open[int((e.start + e.end) / 2 * FPS)] < 0.1
    # Rounded vowels narrow the mouth, spread ones widen it.
    o = next(e for e in events if e.phoneme == "o")
    i = next(e for e in events if e.phoneme == "i")
    assert track.wide[int((o.start + o.end) / 2 * FPS)] < -0.2
    assert track.wide[int((i.start + i.end) / 2 * FPS)] > 0.2


def test_phoneme_timeline_and_silence_agree(engine, prepared):
    events = _timeline("_: m a m a _:", start=1.0)
    sp = Speech(_voiced(2.0, events), phonemes=events)
    av = prepared["mona_low.jpg"]
    frames = render_all(engine, av, sp)
    energy = motion_energy(av, frames)
    # Last vowel ends at 1.55 s: shut within about 0.1 s, like a real mouth.
    assert energy[: int(0.85 * FPS)].max() <= 0.05  # before the first phoneme
    assert energy[int(1.68 * FPS):].max() <= 0.05    # after the last one
    assert energy[int(1.25 * FPS):int(1.55 * FPS)].max() > 3.0


@pytest.mark.parametrize("language,text", [
    ("en", "Bob made a map, and Pam bought a big lamp."),
    ("ru", "Мама мыла раму, а папа пил воду."),
])
def test_real_espeak_speech_closes_on_bilabials(engine, prepared, language, text):
    tts = espeak_or_skip()
    sp = tts.synthesize(text, language)
    assert sp.phonemes, "espeak gave no phoneme timeline"
    av = prepared["avatar.jpg"]
    frames = render_all(engine, av, sp)
    energy = motion_energy(av, frames)
    track = engine.track(sp, FPS)

    def frames_of(start, end):
        a = int(max(0.0, start) * FPS)
        return slice(a, max(a + 1, min(len(energy), int(np.ceil(end * FPS)))))

    # The lips must meet at some moment of each bilabial (a stop's silent
    # closure comes just before its marked burst); open vowels must open at
    # some moment of theirs.
    lab = [e for e in sp.phonemes if e.phoneme.rstrip("'; ") in ("m", "p", "b") and e.end - e.start >= 0.03]
    vow = [e for e in sp.phonemes if viseme(e.phoneme).open >= 0.7 and e.end - e.start >= 0.04]
    assert lab and vow
    closed = [energy[frames_of(e.start - 0.06, e.end)].min() for e in lab]
    opened = [energy[frames_of(e.start, e.end)].max() for e in vow]
    assert np.median(closed) < 0.3 * np.median(opened), (closed, opened)
    assert np.mean(np.array(closed) <= 0.5) >= 0.8, "most bilabials should shut the lips completely"
    t_closed = [track.open[frames_of(e.start - 0.06, e.end)].min() for e in lab]
    t_open = [track.open[frames_of(e.start, e.end)].max() for e in vow]
    assert np.median(t_closed) < 0.3 * np.median(t_open)
    # Without the timeline (as if uploaded), the audio alone still drives the mouth.
    plain = Speech(sp.samples)
    energy2 = motion_energy(av, render_all(engine, av, plain))
    env = frame_rms(sp.samples, len(energy2))
    assert np.corrcoef(smooth3(energy2), smooth3(env))[0, 1] >= 0.5


# ---------------------------------------------------------------- sharing


def test_frames_asked_for_in_another_order_are_the_same_frames(engine, prepared, rendered, speech):
    """A segmented MP4 writer asks for frames interleaved: each is the frame time order gives."""
    name = next(iter(prepared))
    want = rendered[name]
    order = np.random.default_rng(0).permutation(len(want))[:-3]
    got = np.concatenate(list(engine.render(prepared[name], speech, FPS, order=order)))
    assert np.array_equal(got, want[order])


def test_render_is_pure_and_safe_to_share_between_threads(engine, prepared, speech, rendered):
    av = prepared["kennedy_low.jpg"]
    state = av.state
    before = {k: v.copy() for k, v in vars(state).items() if isinstance(v, np.ndarray)}
    results = [None] * 3

    def work(i):
        results[i] = render_all(engine, av, speech)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert np.array_equal(r, rendered["kennedy_low.jpg"])
    for k, v in before.items():
        assert np.array_equal(v, getattr(state, k)), f"render changed the prepared state ({k})"


def test_audio_driver_shapes_differ_for_different_sounds():
    """/i/-like and /u/-like synthetic vowels give spread vs rounded lips."""
    t = np.arange(int(0.6 * SR)) / SR
    f0 = 120

    def vowel(formants):
        # Harmonics weighted by resonances at the given formants.
        sig = np.zeros_like(t)
        for k in range(1, 60):
            f = k * f0
            gain = sum(1.0 / (1.0 + ((f - F) / 80.0) ** 2) for F in formants)
            sig += gain * np.sin(2 * np.pi * f * t)
        return sig / np.abs(sig).max() * 0.3

    silence = np.zeros(int(0.3 * SR))
    x = np.concatenate([silence, vowel((300, 2300)), silence, vowel((320, 800)), silence,
                        vowel((750, 1200)), silence]).astype(np.float32)
    tr = mouth_track(Speech(x), FPS)

    def mid(a, b):
        return slice(int(a * FPS) + 3, int(b * FPS) - 2)

    i_w = tr.wide[mid(0.3, 0.9)].mean()
    u_w = tr.wide[mid(1.2, 1.8)].mean()
    a_o = tr.open[mid(2.1, 2.7)].mean()
    i_o = tr.open[mid(0.3, 0.9)].mean()
    assert i_w > u_w + 0.3
    assert a_o > i_o
    assert tr.open[: int(0.25 * FPS)].max() == 0.0
