"""Limits found by an outside attack run (issue #10): spoken length, SQLite connections,
EXIF orientation, memory of avatar decodes, internals in error messages."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from lipsync.errors import InvalidInputError, PayloadTooLargeError
from lipsync.inputs import check_image, estimate_speech_seconds
from lipsync.jobs.store import JobStore, new_job_id
from lipsync.media import video
from lipsync.media.ffmpeg import sanitize_stderr
from lipsync.server import close_app
from lipsync.service import LipsyncService
from lipsync.settings import Settings
from lipsync.tts.espeak import EspeakTTS
from lipsync.tts.text import split_sentences
from tests.apps import make_app
from tests.conftest import REPO, fixture_path
from tests.media import probe

REALISTIC = {
    "ru": "Добрый день! Меня зовут Анна, и сегодня я расскажу вам о нашей компании. В 2023 году выручка выросла "
          "на 15 процентов, а число сотрудников достигло 250 человек. Спасибо за внимание, до новых встреч!",
    "kk": "Сәлеметсіз бе! Менің атым Айгүл, бүгін мен сізге біздің компания туралы айтып беремін. Құрметті "
          "жолаушылар, 42 нөмірлі пойыз бес минуттан кейін үшінші жолдан жөнелтіледі. Назарларыңызға рахмет.",
    "en": "Good afternoon! My name is Anna, and today I will tell you about our company. In 2023 our revenue "
          "grew by 15 percent, and the number of employees reached 250 people. Thank you for your attention.",
}
# What the attack sent: 5000 Chinese characters, spoken letter by letter by the Kazakh voice.
CJK_ATTACK = "".join(chr(0x4E00 + (i * 37) % 20000) for i in range(5000))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    app = make_app(output_dir=str(root / "outputs"), cache_dir=str(root / "cache"), engine="builtin")
    assert app.extensions["lipsync"].status == "ready", app.extensions["lipsync"].error
    yield app
    close_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


def _clean(app) -> bool:
    tmp_root = os.path.join(app.config["SETTINGS"].output_dir, "tmp")
    return not os.path.exists(tmp_root) or os.listdir(tmp_root) == []


def _speech_seconds(text: str, language: str) -> float:
    tts = EspeakTTS()
    return sum(tts.synthesize(s, language).duration for s in split_sentences(text))


# ------------------------------------------------------- 1. spoken length
@pytest.mark.parametrize("endpoint", ["/api/generate", "/api/jobs"])
def test_text_that_clearly_speaks_too_long_is_refused_before_any_work(client, app, endpoint, monkeypatch):
    service = app.extensions["lipsync"]
    def synthesize(*args):
        raise AssertionError("the text was synthesised")  # an Exception: the request fails (500), never hangs

    monkeypatch.setattr(service.tts, "synthesize", synthesize)
    # (allow_mismatch: the voice was asked for on purpose, whatever the script of the text)
    r = client.post(endpoint, json={"text": CJK_ATTACK, "language": "kk", "allow_mismatch": True})
    assert r.status_code == 413
    body = r.get_json()
    assert body["code"] == "speech_too_long" and "300 s" in body["error"]
    assert _clean(app)


@pytest.mark.parametrize("language", ["ru", "kk", "en"])
def test_the_estimate_is_below_the_real_length_of_realistic_text(language):
    real = _speech_seconds(REALISTIC[language], language)
    estimate = estimate_speech_seconds(REALISTIC[language], language)
    assert 0.5 * real < estimate < real  # a lower bound, and not a uselessly low one


@pytest.mark.parametrize("language", ["ru", "kk", "en"])
def test_the_estimate_is_below_the_real_length_of_spelled_out_scripts(language):
    for text in ("今天天气很好，我们去公园散步吧。", "こんにちは、今日はいい天気ですね。", "12345678901234567890"):
        assert 0 < estimate_speech_seconds(text, language) < _speech_seconds(text, language)


def test_only_a_clear_excess_is_refused_early():
    # a maximal realistic text (5000 characters, about 320 s when spoken) is left to the real check...
    assert estimate_speech_seconds((REALISTIC["ru"] + " ") * 25, "ru") < 300
    # ... the attack is refused from its text: at least 2500 s
    assert estimate_speech_seconds(CJK_ATTACK, "kk") >= 2500


class _CountingTTS:
    def __init__(self, tts):
        self.tts, self.calls = tts, 0
        self.name = tts.name

    def synthesize(self, text, language):
        self.calls += 1
        return self.tts.synthesize(text, language)


def test_speech_over_the_limit_stops_the_render_and_leaves_nothing(tmp_path):
    # Symbols are spoken ("percent", "and") but count nothing in the estimate (a lower bound),
    # so only the real length, summed sentence by sentence, can refuse this text.
    sentence = "% & % & %."
    text = " ".join([sentence] * 20)
    assert estimate_speech_seconds(text, "ru") == 0
    limit = 4.5 * _speech_seconds(sentence, "ru")  # over it in the 5th sentence
    service = LipsyncService(Settings(engine="builtin", output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                                      max_speech_seconds=limit)).load()
    counting = service.tts = _CountingTTS(service.tts)
    stages = []
    (tmp_path / "render").mkdir()
    out = tmp_path / "render" / "long.mp4"
    with pytest.raises(PayloadTooLargeError) as err:
        service.generate(str(out), text=text, language="ru", progress=lambda s, f: stages.append((s, f)))
    assert err.value.code == "speech_too_long" and err.value.status == 413
    assert counting.calls == 5                           # synthesis stopped at the sentence that went over
    assert max(f for s, f in stages if s == "lipsync") <= 4 / 20 + 1e-9  # 4 pieces of 20 rendered at most
    assert "encode" not in {s for s, _ in stages}
    assert os.listdir(tmp_path / "render") == []  # no MP4, no half-written one, no working folder


def test_speech_within_the_limit_renders_whole(tmp_path):
    text = "Привет! Это короткий текст."
    service = LipsyncService(Settings(engine="builtin", output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                                      max_speech_seconds=1.05 * _speech_seconds(text, "ru") + 0.5)).load()
    out = tmp_path / "ok.mp4"
    result = service.generate(str(out), text=text, language="ru")
    assert out.exists() and len(result.segments) == 2


def test_max_speech_seconds_is_a_setting():
    assert Settings().max_speech_seconds == Settings().max_audio_seconds == 300
    assert Settings.from_env({"MAX_SPEECH_SECONDS": "42.5"}).max_speech_seconds == 42.5


# ----------------------------------------------------- 2. SQLite connections
def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sqlite_connections_stay_bounded_whatever_the_number_of_threads(tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"))
    job_id = new_job_id()
    assert store.insert(job_id, created_at=1.0, request={}, callback_url=None, max_queued=10)

    def burst(n: int) -> None:
        start = threading.Barrier(n)
        errors = []

        def client():
            try:
                start.wait()
                for _ in range(3):
                    assert store.get(job_id)["status"] == "queued"
                    store.queued_count()
                    store.status_counts()
                    store.update_progress(job_id, "tts", 0.5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

    with contextlib.ExitStack() as stack:  # the pool filled: its connections are in the baseline
        for _ in range(store.pool_size):
            stack.enter_context(store._connection())
    assert store.open_connections() == store.pool_size
    baseline = _open_files()
    burst(200)
    assert _open_files() <= baseline + 2
    assert store.open_connections() <= store.pool_size
    burst(200)
    assert _open_files() <= baseline + 2
    store.close()
    assert store.open_connections() == 0
    assert store.get(job_id)["id"] == job_id  # still usable after close()
    store.close()


def test_a_failed_transaction_gives_back_a_clean_connection(tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"), pool_size=1)
    with pytest.raises(ZeroDivisionError):
        with store._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            raise ZeroDivisionError
    assert store.insert(new_job_id(), created_at=1.0, request={}, callback_url=None, max_queued=10)
    store.close()


# --------------------------------------------------------- 3. EXIF orientation
def _rotated_with_exif(fmt: str = "JPEG") -> bytes:
    """The avatar fixture stored sideways (rotated 90° counter-clockwise) with EXIF orientation 6,
    so that a viewer that honours EXIF shows it upright, as phones save portraits."""
    with Image.open(fixture_path("avatar.jpg")) as upright:
        sideways = upright.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = io.BytesIO()
    sideways.save(out, fmt, exif=exif, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_image_applies_the_exif_orientation(fmt):
    upright = cv2.imread(str(fixture_path("avatar.jpg")))
    image = video.decode_image(_rotated_with_exif(fmt))
    assert image.shape == upright.shape
    assert np.abs(image.astype(int) - upright).mean() < 2


def test_the_pixel_limit_still_reads_the_header_of_a_rotated_image():
    data = _rotated_with_exif()
    with pytest.raises(InvalidInputError) as err:
        video.decode_image(data, max_pixels=1290 * 1483 - 1)
    assert err.value.code == "image_too_large"
    with pytest.raises(InvalidInputError):
        check_image(data, 1290 * 1483 - 1)
    assert check_image(data, 1290 * 1483) == data


def test_a_portrait_phone_photo_as_avatar_gives_an_upright_video(client, app, tmp_path):
    r = client.post("/api/generate", data={"text": "Привет!", "language": "ru",
                                           "avatar": (io.BytesIO(_rotated_with_exif()), "phone.jpg")},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_json()
    out = tmp_path / "out.mp4"
    out.write_bytes(r.data)
    info = probe(out)
    assert info["height"] > info["width"]  # 1290x1483 portrait -> 626x720
    assert (info["width"], info["height"]) == (626, 720)
    assert _clean(app)


def test_a_rotated_avatar_path_loads_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(_rotated_with_exif())
    service = LipsyncService(Settings(engine="builtin", avatar_path=str(path), output_dir=str(tmp_path / "o"),
                                      cache_dir=str(tmp_path / "c"))).load()
    assert service.status == "ready", service.error
    assert service.avatar.image.shape[:2] == (720, 626)


# ------------------------------------------------------ 4. memory of decodes
SIDE = 6320  # 39.9 megapixels: just within the default MAX_IMAGE_PIXELS


def _big_png16(path) -> None:
    """A 6320x6320 16-bit RGBA PNG of mostly one colour (a few hundred KB), written row by row
    (never held whole in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    plain = b"\0" + np.tile(np.array([12000, 30000, 50000, 65535], ">u2"), SIDE).tobytes()
    spot = np.tile(np.array([12000, 30000, 50000, 65535], ">u2"), SIDE)
    spot[4 * 3000: 4 * 3400] = 1000
    spotted = b"\0" + spot.tobytes()
    pack = zlib.compressobj(6)
    data = b"".join(pack.compress(spotted if 3000 <= y < 3400 else plain) for y in range(SIDE)) + pack.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", SIDE, SIDE, 16, 6, 0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))


_DECODES = """
import json, os, resource, sys, threading
from lipsync.service import LipsyncService
from lipsync.settings import Settings

method, path, out = sys.argv[1:4]
service = LipsyncService(Settings(output_dir=out))
data = open(path, "rb").read()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
errors = []
def decode():
    try:
        result = getattr(service, method)(data)
        assert result is None or result.ndim == 3
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=decode) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "after": rss(), "errors": errors}))
"""


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("bigpng") / "big16.png"
    _big_png16(path)
    assert path.stat().st_size < 1_000_000
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["check_avatar", "decode_avatar"])
def test_eight_concurrent_decodes_of_a_16_bit_png_stay_within_two_decodes_of_memory(big_png, tmp_path, method):
    # One decode's worth: the full-size image as 8-bit BGR, twice (OpenCV's decode buffer and
    # the result; 240 MB here). At most two decodes run at once, so the peak stays within two
    # of those above the baseline. (Before: each decode went through 16-bit RGBA, 8-bit RGBA and
    # BGR copies, about 620 MB, all eight at once: 4.8 GB.)
    worth = 2 * SIDE * SIDE * 3
    run = subprocess.run([sys.executable, "-c", _DECODES, method, str(big_png), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["errors"] == []
    assert m["peak"] - m["base"] < 2 * worth, m
    assert m["after"] - m["base"] < 0.25 * worth, m  # and given back


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_large_images_are_decoded_reduced_but_never_below_twice_the_output_height(big_png):
    service = LipsyncService(Settings())
    image = service.decode_avatar(big_png.read_bytes())
    assert image.shape == (SIDE // 4, SIDE // 4, 3)  # 1580 >= 2 x 720 > 790
    assert np.abs(image[0, 0].astype(int) - [50000 // 257, 30000 // 257, 12000 // 257]).max() <= 1  # BGR, 8 bits
    png = cv2.imencode(".png", np.zeros((3000, 2900, 3), np.uint8))[1].tobytes()
    assert service.decode_avatar(png).shape == (1500, 1450, 3)
    with_box = LipsyncService(Settings(face_box=(10, 10, 100, 100)))  # FACE_BOX: pixels of the full image
    assert with_box.decode_avatar(png).shape == (3000, 2900, 3)


# ------------------------------------------------- 5. internals in messages
_GARBAGE_WAV = (b"RIFF" + struct.pack("<I", 1000) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + b"\xff" * 16
                + b"data" + b"\0" * 20)
_GARBAGE_MP3 = b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8


@pytest.mark.parametrize("data", [_GARBAGE_WAV, _GARBAGE_MP3], ids=["wav", "mp3"])
def test_audio_errors_carry_no_paths_addresses_or_temp_names(client, app, data, caplog):
    caplog.set_level("WARNING", logger="lipsync.media.ffmpeg")
    r = client.post("/api/generate", data={"audio": (io.BytesIO(data), "speech.wav")},
                    content_type="multipart/form-data")
    assert r.status_code == 400
    body = r.get_json()
    assert body["code"] == "invalid_audio"
    message = body["error"]
    assert message.startswith("could not decode the audio: ")
    assert "/" not in message and "0x" not in message and "up-" not in message and "tmp" not in message
    assert "<file>" in message
    # the whole stderr, path and addresses included, is in the server log
    logged = "\n".join(rec.getMessage() for rec in caplog.records if rec.name == "lipsync.media.ffmpeg")
    assert "0x" in logged and "/upload" in logged
    assert _clean(app)


def test_sanitize_stderr():
    stderr = ("[in#0 @ 0x55c49d072240] Invalid sample rate: -1\n"
              "Error opening input file outputs/tmp/up-9880-a1b2/upload.\n"
              "/srv/app/outputs/jobs/x/final.mp4: No space left; tbr 1/25; see /tmp/my dir/a b.wav")
    clean = sanitize_stderr(stderr, paths=["/tmp/my dir/a b.wav"])
    assert clean == ("[in#0] Invalid sample rate: -1\n"
                     "Error opening input file <file>.\n"
                     "<file>: No space left; tbr 1/25; see <file>")
