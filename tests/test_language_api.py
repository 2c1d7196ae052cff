"""The speech language over HTTP: "auto", refused mismatches, allowed accents, the chosen voice
reported (X-Speech-Language, the job record). Real pipeline, espeak-ng, built-in engine."""

from __future__ import annotations

import pytest

from tests.apps import unlimited_app

RUSSIAN = "Привет, как дела?"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with unlimited_app(tmp_path_factory.mktemp("language")) as app:
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


def test_an_explicit_language_that_does_not_fit_the_text_is_refused_naming_the_detected_one(client):
    r = client.post("/api/generate", json={"text": RUSSIAN, "language": "en"})
    assert r.status_code == 400 and r.get_json()["code"] == "language_mismatch"
    assert "Russian" in r.get_json()["error"]
    r = client.post("/api/jobs", json={"text": RUSSIAN, "language": "en"})
    assert r.status_code == 400 and r.get_json()["code"] == "language_mismatch"


def test_auto_speaks_with_the_texts_voice_and_an_allowed_accent_spells_it_out(client):
    auto = client.post("/api/generate", json={"text": RUSSIAN, "language": "auto"})
    assert auto.status_code == 200 and auto.headers["X-Speech-Language"] == "ru"
    accent = client.post("/api/generate", json={"text": RUSSIAN, "language": "en", "allow_mismatch": True})
    assert accent.status_code == 200 and accent.headers["X-Speech-Language"] == "en"
    # the English voice spells Cyrillic letter by letter: much longer than the Russian voice
    assert float(accent.headers["X-Video-Duration"]) > 1.8 * float(auto.headers["X-Video-Duration"])
    kazakh = client.post("/api/generate", json={"text": "Сәлеметсіз бе!", "language": "auto"})
    assert kazakh.status_code == 200 and kazakh.headers["X-Speech-Language"] == "kk"


def test_an_omitted_language_keeps_todays_default_whatever_the_text(client):
    r = client.post("/api/generate", json={"text": "Hello there."})
    assert r.status_code == 200 and r.headers["X-Speech-Language"] == "ru"


def test_the_form_and_the_job_record_carry_the_choice(app, client):
    r = client.post("/api/jobs", data={"text": RUSSIAN, "language": "en", "allow_mismatch": "true"},
                    content_type="multipart/form-data")
    assert r.status_code == 202, r.get_data(as_text=True)
    state = app.extensions["jobs"].wait(r.get_json()["id"], timeout=120)
    assert state["status"] == "done" and state["language"] == "en"  # the allowed accent survives the queue
    r = client.post("/api/jobs", json={"text": RUSSIAN, "language": "auto"})
    assert r.status_code == 202 and r.get_json()["language"] == "ru"
    assert app.extensions["jobs"].wait(r.get_json()["id"], timeout=120)["status"] == "done"


@pytest.mark.parametrize("value", ["maybe", 1, None])
def test_allow_mismatch_must_be_a_boolean(client, value):
    r = client.post("/api/generate", json={"text": RUSSIAN, "language": "ru", "allow_mismatch": value})
    assert r.status_code == 400 and r.get_json()["code"] == "invalid_input"
