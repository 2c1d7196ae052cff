"""The OpenAPI document (/api/openapi.json) against the real API.

* Every Flask route is in the document with exactly its methods, and nothing else is.
* Schemathesis (property-based fuzzing from the document: examples, boundary "coverage" cases,
  random and schema-violating inputs, and stateful sequences following the links it infers, e.g.
  POST /api/jobs -> GET/DELETE /api/jobs/{id}) runs against a live server with an API key set:
  no 5xx, status codes / content types / headers / bodies conform to the document, requests that
  violate the schema are refused, and operations documented as protected refuse a missing key.
  Texts are kept short (MAX_TEXT_CHARS=40 on the fuzzed server, so the document's maxLength is 40)
  because every accepted text is a real render.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from lipsync.server import close_app
from lipsync.server.openapi import build_openapi
from lipsync.server.settings import ServerSettings
from lipsync.settings import Settings
from tests.apps import make_app
from tests.conftest import wait_until
from tests.test_faults import LiveServer, free_port, leftovers, shared_cache  # noqa: F401 (fixture)

FUZZ_KEY = "fuzz-key-0123456789abcdef01234567"
MAX_EXAMPLES = 100
SEED = 7


def _routes(app) -> dict[str, set[str]]:
    """{openapi path: methods} of the Flask app."""
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    return routes


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi")
    app = make_app(output_dir=str(root / "o"), cache_dir=str(root / "c"), engine="builtin",
                   api_keys=(FUZZ_KEY,), max_text_chars=123)
    yield app
    close_app(app)


def test_every_route_is_documented_with_exactly_its_methods(app):
    document = app.test_client().get("/api/openapi.json").get_json()
    documented = {path: {m for m in item if m in ("get", "post", "put", "patch", "delete")}
                  for path, item in document["paths"].items()}
    assert documented == _routes(app)


def test_the_document_states_the_running_limits_and_security(app):
    document = app.test_client().get("/api/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    body = document["paths"]["/api/generate"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["properties"]["text"]["maxLength"] == 123
    assert body["multipart/form-data"]["schema"]["properties"]["audio"]["format"] == "binary"
    assert set(document["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader", "apiKeyQuery"}
    for path, method in (("/api/generate", "post"), ("/api/jobs", "post"), ("/api/jobs/{job_id}", "get"),
                         ("/metrics", "get")):
        operation = document["paths"][path][method]
        assert operation["security"] and "401" in operation["responses"], path
    for path in ("/", "/api/health", "/api/avatar", "/api/openapi.json", "/static/{filename}"):
        assert document["paths"][path]["get"]["security"] == [], path
    rate_limited = document["paths"]["/api/generate"]["post"]["responses"]["429"]
    assert rate_limited["headers"]["Retry-After"]["required"] is True
    for item in document["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response["headers"], (method, status)
                if status.startswith(("4", "5")):  # errors are JSON
                    assert response["content"]["application/json"]["schema"], (method, status)
    # without keys: no security requirements, no 401
    open_doc = build_openapi(Settings(), ServerSettings())
    assert "securitySchemes" not in open_doc["components"]
    assert "401" not in open_doc["paths"]["/api/generate"]["post"]["responses"]


@pytest.mark.slow
def test_schemathesis_finds_nothing_on_a_live_server(tmp_path, shared_cache, capsys):
    # Webhooks to whatever callback_url the fuzzer invents must stay on this machine: the server's
    # urllib goes through a "proxy" on a closed loopback port (connection refused, no DNS lookup).
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    server = LiveServer(tmp_path, {"MAX_TEXT_CHARS": "40", "MAX_UPLOAD_BYTES": str(1024 * 1024), "API_KEYS": FUZZ_KEY,
                                   "RATE_LIMIT": "off", "RATE_LIMIT_READ": "off", "JOB_QUEUE_SIZE": "4",
                                   # a live session the fuzzer opens ends soon (its video stream with it)
                                   "MAX_SESSIONS": "1", "SESSION_IDLE_SECONDS": "2",
                                   "WEBHOOK_RETRIES": "0", "http_proxy": dead_proxy, "https_proxy": dead_proxy,
                                   "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy, "no_proxy": "",
                                   "NO_PROXY": ""}, name="fuzzed", cache_dir=shared_cache)
    server.start()
    try:
        config = tmp_path / "schemathesis.toml"
        # 413 is how this API refuses a body over a limit (text, upload, audio length)
        # POST /api/avatars: generated bytes are never a photo with one face, so nearly every
        # example is (rightly) refused; tests/test_avatars.py uploads real photos.
        config.write_text("[checks.negative_data_rejection]\n"
                          "expected-statuses = [400, 401, 404, 405, 406, 409, 413, 415, 422, 429]\n\n"
                          "[[operations]]\ninclude-path = \"/api/avatars\"\ninclude-method = \"POST\"\n"
                          "warnings = false\n\n"
                          # a WebSocket: a plain GET is (rightly) always refused; tests/test_live.py talks to it
                          "[[operations]]\ninclude-path-regex = \"/ws$\"\nwarnings = false\n\n"
                          # the fuzzer's sessions end at once (idle); DELETE of an ended one is a 404
                          "[[operations]]\ninclude-path-regex = \"^/api/sessions/\"\nwarnings = false\n")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # the fuzzer talks to loopback
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
             server.url("/api/openapi.json"), "-H", f"Authorization: Bearer {FUZZ_KEY}",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                         "response_headers_conformance,response_schema_conformance,negative_data_rejection,"
                         "unsupported_method,ignored_auth",
             "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--generation-database", "none",
             "--workers", "1", "--request-timeout", "60"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
        elapsed = time.monotonic() - started
        summary = [line for line in run.stdout.splitlines() if "generated" in line or "issues found" in line
                   or "failure" in line]
        with capsys.disabled():
            print(f"\n[schemathesis] {elapsed:.0f} s: " + " | ".join(s.strip() for s in summary))
        assert run.returncode == 0, run.stdout[-15000:] + run.stderr[-3000:]
        assert "No issues found" in run.stdout

        # Afterwards: healthy, the accepted jobs finish, nothing left behind, nothing crashed.
        assert server.get("/api/health").status_code == 200
        jobs_dir = server.output_dir / "jobs"
        auth = {"Authorization": f"Bearer {FUZZ_KEY}"}

        def jobs_ended() -> bool:
            states = [server.get(f"/api/jobs/{p.name}", headers=auth).json() for p in jobs_dir.iterdir()
                      if len(p.name) == 32]
            return all(s.get("status", "done") in ("done", "failed", "cancelled") for s in states)

        wait_until(jobs_ended, timeout=120, interval=0.2, message="the jobs the fuzzer submitted to end")
        done = {p.name for p in jobs_dir.iterdir() if (p / "video.mp4").exists()}
        assert leftovers(server.output_dir, keep_jobs=done) == []
        logs = server.log_text()
        assert "Traceback" not in logs and '"status":500' not in logs
    finally:
        server.stop()
