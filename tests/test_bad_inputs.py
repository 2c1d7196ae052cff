"""Bad inputs against a live server (`python app.py` on loopback, real HTTP): malformed and
mistyped JSON, empty and huge bodies, junk uploads, disguised files, a 20000x20000 PNG, a
truncated MP3, an audio "bomb", playlists that would make ffmpeg read local files, unicode edge
cases, path-like ids. Each gets a 4xx JSON error (or a video where the input is valid), never a
5xx; afterwards the server is healthy and no working file is left."""

from __future__ import annotations

import http.client
import json
import struct
import time
import zlib

import numpy as np
import pytest

from lipsync.media.audio import write_wav
from lipsync.media.ffmpeg import run_ffmpeg
from tests.conftest import wait_until
from tests.test_faults import LiveServer, leftovers, proc_status

pytestmark = pytest.mark.slow

MAX_CHARS = 200
MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    live = LiveServer(root, {"MAX_TEXT_CHARS": str(MAX_CHARS), "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
                             "MAX_AUDIO_SECONDS": "5", "RATE_LIMIT": "off", "RATE_LIMIT_READ": "off",
                             "JOB_QUEUE_SIZE": "64"}, name="bad-inputs").start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-media")
    t = np.arange(16000 * 2) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    write_wav(str(root / "tone.wav"), tone)
    run_ffmpeg(["-i", str(root / "tone.wav"), "-c:a", "libmp3lame", "-b:a", "64k", str(root / "tone.mp3")])
    # 60 s of silence as FLAC: a few KB that decode to 12 times the 5 s limit
    run_ffmpeg(["-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "60", "-c:a", "flac", str(root / "long.flac")])
    return {"wav": (root / "tone.wav").read_bytes(), "mp3": (root / "tone.mp3").read_bytes(),
            "long_flac": (root / "long.flac").read_bytes()}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A real, valid 20000x20000 greyscale PNG, all zero: ~400 MB of pixels, ~400 KB of file."""
    width = height = 20000
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [compressor.compress(row * 500) for _ in range(height // 500)]
    idat = b"".join(parts) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _assert_error(r, statuses, codes=None):
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:300]}"
    body = r.json()
    assert set(body) >= {"error", "code"} and body["error"] and body["code"], body
    assert "Traceback" not in r.text
    if codes is not None:
        assert body["code"] in codes, body
    return body


# --------------------------------------------------------------------- JSON
MALFORMED = [b"{", b"", b"null", b"[]", b'"text"', b"42", b'{"text": }', b"\xff\xfe\x00\x01", b'{"text": "a"',
             b"{'text': 'single quotes'}", b'{"text": "a"}garbage', b"[" * 5000 + b"]" * 5000,
             b'{"a":' * 3000 + b"1" + b"}" * 3000]


@pytest.mark.parametrize("path", ["/api/generate", "/api/jobs"])
@pytest.mark.parametrize("body", MALFORMED, ids=lambda b: repr(b[:16]))
def test_malformed_json_is_400(server, path, body):
    r = server.post(path, data=body, headers={"Content-Type": "application/json"})
    _assert_error(r, {400}, {"invalid_json", "missing_input"})


WRONG_TYPES = [
    ({"text": 5, "language": "en"}, "invalid_text"),
    ({"text": ["a"], "language": "en"}, "invalid_text"),
    ({"text": {"a": 1}, "language": "en"}, "invalid_text"),
    ({"text": None, "language": "en"}, "invalid_text"),
    ({"text": True, "language": "en"}, "invalid_text"),
    ({"text": 1.5e300, "language": "en"}, "invalid_text"),
    ({"text": "hi", "language": 7}, "unsupported_language"),
    ({"text": "hi", "language": None}, "unsupported_language"),
    ({"text": "hi", "language": ["en"]}, "unsupported_language"),
    ({"text": "hi", "language": "de"}, "unsupported_language"),
    ({"text": "hi", "language": ""}, "unsupported_language"),
    ({"text": "", "language": "en"}, "empty_text"),
    ({"text": " \t\n", "language": "en"}, "empty_text"),
    ({"language": "en"}, "missing_input"),
]


@pytest.mark.parametrize("path", ["/api/generate", "/api/jobs"])
@pytest.mark.parametrize("body,code", WRONG_TYPES, ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else v)
def test_wrong_types_are_400_with_their_code(server, path, body, code):
    _assert_error(server.post(path, json=body), {400}, {code})


def test_non_finite_numbers_and_bad_callbacks_are_400(server):
    r = server.post(
        "/api/generate", data=b'{"text": "hi", "language": NaN}', headers={"Content-Type": "application/json"}
    )
    _assert_error(r, {400}, {"unsupported_language"})
    for callback in (5, "", "ftp://x/y", "http://", "javascript:alert(1)", "http://a b", "http://x:0/", "x" * 3000):
        r = server.post("/api/jobs", json={"text": "hi", "language": "en", "callback_url": callback})
        _assert_error(r, {400}, {"invalid_callback_url"})


# -------------------------------------------------------- empty, huge bodies
def test_empty_bodies_are_400(server):
    _assert_error(server.post("/api/generate"), {400}, {"invalid_json"})
    r = server.post("/api/generate", data=b"--x--\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"})
    _assert_error(r, {400}, {"missing_input"})
    r = server.post("/api/generate", data=b"garbage", headers={"Content-Type": "multipart/form-data"})
    _assert_error(r, {400}, {"missing_input"})
    r = server.post("/api/jobs", files={"language": (None, "en")})
    _assert_error(r, {400}, {"missing_input"})


def test_huge_bodies_are_413_before_any_work(server):
    big_json = json.dumps({"text": "a" * (5 * 1024 * 1024), "language": "en"}).encode()
    started = time.monotonic()
    _assert_error(
        server.post("/api/generate", data=big_json, headers={"Content-Type": "application/json"}),
        {413},
        {"payload_too_large"},
    )
    # the same without a Content-Length (chunked): cut off at the limit, not read whole
    chunks = (big_json[i : i + 65536] for i in range(0, len(big_json), 65536))
    r = server.post("/api/generate", data=chunks, headers={"Content-Type": "application/json"})
    _assert_error(r, {413}, {"payload_too_large"})
    _assert_error(
        server.post("/api/jobs", files={"audio": ("a.wav", b"\0" * (MAX_UPLOAD + 2 * 1024 * 1024))}),
        {413},
        {"payload_too_large"},
    )
    _assert_error(
        server.post("/api/generate", files={"audio": ("a.wav", b"RIFF" + b"\0" * (MAX_UPLOAD + 10))}),
        {413},
        {"upload_too_large"},
    )
    _assert_error(
        server.post("/api/generate", files={"text": (None, "a" * 600_000)}),
        {413},
        {"payload_too_large", "text_too_long"},
    )
    _assert_error(
        server.post("/api/generate", json={"text": "я" * (MAX_CHARS + 1), "language": "ru"}), {413}, {"text_too_long"}
    )
    assert time.monotonic() - started < 30


def test_text_at_the_limit_is_accepted(server):
    r = server.post("/api/generate", json={"text": ("Да. " * MAX_CHARS)[:MAX_CHARS], "language": "ru"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "video/mp4"


# ------------------------------------------------------------------ uploads
def test_junk_and_disguised_audio_is_400_before_ffmpeg_reads_it(server, media):
    rng = np.random.default_rng(1)
    cases = {
        "random.mp3": rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "zeros.wav": b"\0" * 10_000,
        "text.ogg": b"this is not audio at all\n" * 100,
        "page.wav": b"<html><body>not audio</body></html>",
        "playlist.mp3": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        "concat.mp3": b"ffconcat version 1.0\nfile '/etc/passwd'\n",
        "riff-garbage.wav": b"RIFF\x10\x00\x00\x00WAVEfmt " + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "image.mp3": b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
    }
    for name, data in cases.items():
        for path in ("/api/generate", "/api/jobs"):
            body = _assert_error(server.post(path, files={"audio": (name, data)}), {400}, {"invalid_audio"})
            assert "/etc/passwd" not in body["error"] and "root:" not in body["error"], name


def test_truncated_and_valid_recordings(server, media):
    r = server.post("/api/generate", files={"audio": ("tone.mp3", media["mp3"])})
    assert r.status_code == 200 and r.headers["Content-Type"] == "video/mp4"
    cut = media["mp3"][: len(media["mp3"]) * 6 // 10]
    r = server.post("/api/generate", files={"audio": ("cut.mp3", cut)})
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 200:
        assert float(r.headers["X-Video-Duration"]) < 2.0  # what was there, not the announced length
    r = server.post("/api/generate", files={"audio": ("cut.wav", media["wav"][:60])})
    assert r.status_code in (200, 400), r.text[:300]


def test_audio_that_expands_past_the_duration_limit_is_413_without_decoding_it_all(server, media):
    started = time.monotonic()
    body = _assert_error(
        server.post("/api/generate", files={"audio": ("long.flac", media["long_flac"])}), {413}, {"audio_too_long"}
    )
    assert "5 s" in body["error"]
    _assert_error(
        server.post("/api/jobs", files={"audio": ("long.flac", media["long_flac"])}), {413}, {"audio_too_long"}
    )
    assert time.monotonic() - started < 10


def test_bad_avatars_are_400(server, huge_png):
    rng = np.random.default_rng(2)
    png_head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    cases = {
        "notes.png": (b"just some text renamed to .png\n" * 20, {"invalid_image"}),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', {"invalid_image"}),
        "random.jpg": (rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(), {"invalid_image"}),
        "cut.png": (png_head + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)[:20]), {"invalid_image"}),
        "zero.png": (
            b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)),
            {"invalid_image"},
        ),
        "nosof.jpg": (
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9",
            {"invalid_image"},
        ),
        "huge.png": (huge_png, {"image_too_large"}),
        "gif.png": (b"GIF89a" + b"\0" * 100, {"invalid_image"}),
    }
    pid = server.server_pid
    rss_before = proc_status(pid)["VmRSS"]
    for name, (data, codes) in cases.items():
        for path in ("/api/generate", "/api/jobs"):
            started = time.monotonic()
            r = server.post(path, files={"avatar": (name, data), "text": (None, "Hello"), "language": (None, "en")})
            _assert_error(r, {400}, codes)
            assert time.monotonic() - started < 5, name
    # the 400-megapixel image was refused from its header: it was never decoded
    assert proc_status(pid)["VmRSS"] - rss_before < 100 * 1024


# ------------------------------------------------------------------ unicode
UNICODE = [
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "\u202eHello reversed",
    "😀🎉🚀",
    "Hello 😀 world 🌍",
    "\u200b\u200c\u200d\u2060",
    "a\u200bb\u200cc",
    "H̷̢e̸l̵l̶o̴ w̷o̶r̵l̷d̸",
    "e" + "\u0301" * 150,
    "\ufeffHello with a BOM",
    "Hello\x00World\x07\x1b[31m",
    "\u2028\u2029line separators",
    "...!?;:",
    "\uffff\ufffe noncharacters",
    "Сәлеметсіз бе! Қазақ тілі",
    "日本語のテキスト",
    "𝕳𝖊𝖑𝖑𝖔 𝖜𝖔𝖗𝖑𝖉",
    "Привет\r\nмир\tс табуляцией",
]


@pytest.mark.parametrize("text", UNICODE, ids=lambda t: t.encode("unicode_escape").decode()[:24])
def test_unicode_edge_cases_make_a_video_or_a_clear_4xx(server, text):
    for language in ("en", "ru"):
        r = server.post("/api/generate", json={"text": text, "language": language})
        if r.status_code == 200:
            assert r.headers["Content-Type"] == "video/mp4" and len(r.content) > 1000
        else:
            _assert_error(r, {400, 413, 422})
    r = server.post("/api/generate", files={"text": (None, text), "language": (None, "en")})
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]


def test_lone_surrogates_are_refused(server):
    r = server.post(
        "/api/generate",
        data=b'{"text": "bad \\ud800 half", "language": "en"}',
        headers={"Content-Type": "application/json"},
    )
    _assert_error(r, {400}, {"invalid_text"})
    r = server.post(
        "/api/jobs", data=b'{"text": "\\udfff", "language": "en"}', headers={"Content-Type": "application/json"}
    )
    _assert_error(r, {400}, {"invalid_text"})


# --------------------------------------------------------------- path-like ids
RAW_PATHS = [
    "/api/jobs/../../etc/passwd",
    "/api/jobs/..%2F..%2Fetc%2Fpasswd",
    "/api/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/jobs/..%252f..%252fetc%252fpasswd",
    "/api/jobs/" + "0" * 32 + "/../../../etc/passwd",
    "/api/jobs/" + "A" * 32,
    "/api/jobs/" + "0" * 31,
    "/api/jobs/" + "0" * 33,
    "/api/jobs/%00",
    "/api/jobs/" + "%D9%A0" * 32,
    "/api/jobs/" + "0" * 32 + "%00",
    "/api/jobs/.",
    "/api/jobs/~root",
    "/api/jobs/" + "x" * 5000,
]


@pytest.mark.parametrize("raw", RAW_PATHS, ids=lambda p: p[10:40])
def test_path_like_job_ids_are_404_on_every_route(server, raw):
    for suffix in ("", "/video", "/events", "/stream"):
        for method in ("GET", "DELETE") if suffix == "" else ("GET",):
            status, body = _raw(server, method, raw + suffix)
            assert status in (404, 405), (method, raw + suffix, status)
            data = json.loads(body)
            assert data["code"] in ("job_not_found", "not_found", "method_not_allowed")
            assert b"root:" not in body


@pytest.mark.parametrize(
    "raw",
    [
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static//etc/passwd",
        "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/static/..\\app.py",
        "/static/app.js%00.png",
    ],
)
def test_static_paths_never_leave_the_static_folder(server, raw):
    status, body = _raw(server, "GET", raw)
    assert status in (400, 404, 308), (raw, status)  # 308: werkzeug merges "//" by redirecting (to a 404)
    assert b"create_app" not in body and b"root:" not in body


def _raw(server, method: str, path: str) -> tuple[int, bytes]:
    """A request with the path exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -------------------------------------------------------------- afterwards
def test_zz_server_is_healthy_and_nothing_is_left_on_disk(server):
    """Runs last in this module: every refused request cleaned up after itself."""
    assert server.get("/api/health").status_code == 200
    jobs_dir = server.output_dir / "jobs"

    def jobs_ended() -> bool:
        states = [server.get(f"/api/jobs/{p.name}").json() for p in jobs_dir.iterdir() if len(p.name) == 32]
        return all(s.get("status") in ("done", "failed", "cancelled") for s in states)

    wait_until(jobs_ended, timeout=60, interval=0.2, message="the accepted jobs (valid inputs) to end")
    done = {p.name for p in jobs_dir.iterdir() if (p / "video.mp4").exists()}
    assert leftovers(server.output_dir, keep_jobs=done) == []
    logs = server.log_text()
    assert "Traceback" not in logs and '"status":500' not in logs and "internal_error" not in logs
