"""The speech language follows the text (issue #17): lipsync/tts/language.py, validate_request,
and espeak-ng's own reading of Latin brand names inside Russian and Kazakh sentences."""

from __future__ import annotations

import pytest

from lipsync.errors import InvalidInputError
from lipsync.tts.base import DEFAULT_LANGUAGE, LANGUAGE_CHOICES, LANGUAGES, validate_request
from lipsync.tts.language import KAZAKH_LETTERS, detect_language, resolve_language

RUSSIAN = "Доброе утро, как ваши дела?"
KAZAKH = "Қайырлы таң, қалыңыз қалай?"
ENGLISH = "Good morning, how are you today?"
NO_LETTERS = ["12345", "12:30, 5%", "?!…", "— « » —", "😀🎉👍", "+7 (777) 123-45-67", " \t 42 \n"]


# ------------------------------------------------------------------ detection
@pytest.mark.parametrize("letter", sorted(KAZAKH_LETTERS))
def test_each_kazakh_only_letter_makes_a_cyrillic_text_kazakh(letter):
    assert detect_language(f"Привет, {letter}") == "kk"
    assert detect_language(letter) == "kk"


def test_the_kazakh_letters_are_the_nine_in_both_cases():
    lower = set("әғқңөұүһі")
    assert KAZAKH_LETTERS == lower | {c.upper() for c in lower}
    assert len(KAZAKH_LETTERS) == 18


@pytest.mark.parametrize("text, expected", [
    (RUSSIAN, "ru"), (KAZAKH, "kk"), (ENGLISH, "en"),
    ("Съешь же ещё этих мягких французских булок, да выпей чаю.", "ru"),
    ("ЁЛКА И ЁЖ", "ru"),                      # upper case counts the same
    ("ҚАЗАҚСТАН", "kk"), ("қазақстан", "kk"),
    ("HELLO WORLD", "en"), ("hello world", "en"),
    ("Café Müller, señor!", "en"),             # accented Latin letters are Latin
    ("Мы поехали в Қарағанды.", "kk"),         # one Kazakh word is enough (the ru voice names those letters)
    ("Привет", "ru"), ("Hi", "en"),
])
def test_single_script_texts(text, expected):
    assert detect_language(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Купите iPhone сегодня.", "ru"),          # 12 Cyrillic letters, 6 Latin
    ("Подключите Wi-Fi в кафе.", "ru"),
    ("Say привет to everyone.", "en"),        # 13 Latin, 6 Cyrillic
    ("Мен жаңа iPhone сатып алдым.", "kk"),   # Cyrillic majority, with a Kazakh letter
    ("Buy a new Қазақ phone today", "en"),    # Latin majority: Kazakh letters do not matter
    ("Ab Вг", "ru"),                          # a tie goes to Cyrillic
    ("ab әі", "kk"),
    ("abc Вг", "en"),
])
def test_mixed_texts_go_by_the_majority_of_letters(text, expected):
    assert detect_language(text) == expected


@pytest.mark.parametrize("text", NO_LETTERS + ["", "   ", "αβγ δ", "你好", "مرحبا"])
def test_texts_without_latin_or_cyrillic_letters_have_no_language(text):
    assert detect_language(text) is None


def test_digits_and_emoji_do_not_change_the_vote():
    assert detect_language("Привет 123456789 😀😀😀 !!!") == "ru"
    assert detect_language("Hi 2026 год") == "ru"  # 3 Cyrillic letters against 2 Latin


# ------------------------------------------------------------------ auto
@pytest.mark.parametrize("text, expected", [(RUSSIAN, "ru"), (KAZAKH, "kk"), (ENGLISH, "en"),
                                            ("Купите iPhone сегодня.", "ru")])
def test_auto_speaks_the_detected_language(text, expected):
    assert resolve_language(text, "auto") == expected


@pytest.mark.parametrize("text", NO_LETTERS)
def test_auto_without_letters_is_the_default_language(text):
    assert resolve_language(text, "auto") == DEFAULT_LANGUAGE == "ru"


@pytest.mark.parametrize("spelling", ["auto", "AUTO", " Auto ", "\tauto\n"])
def test_auto_in_any_case_and_with_spaces(spelling):
    assert resolve_language(ENGLISH, spelling) == "en"


def test_auto_is_a_choice_but_not_a_voice():
    assert LANGUAGES == ("ru", "kk", "en")
    assert LANGUAGE_CHOICES == ("auto", "ru", "kk", "en")


# ------------------------------------------------------------------ explicit languages
@pytest.mark.parametrize("text, language", [
    (RUSSIAN, "ru"), (KAZAKH, "kk"), (ENGLISH, "en"),
    (RUSSIAN, "kk"),                          # Kazakh's alphabet holds the Russian one: accepted
    ("Купите iPhone сегодня.", "ru"), ("Say привет to everyone.", "en"),
    (" Доброе утро ", " RU "),
])
def test_an_explicit_language_that_fits_the_text_is_kept(text, language):
    assert resolve_language(text, language) == language.strip().lower()


@pytest.mark.parametrize("text, language, detected", [
    (RUSSIAN, "en", "ru"),                    # the bug of issue #17: Russian spelled out by the English voice
    (KAZAKH, "en", "kk"),
    (ENGLISH, "ru", "en"),
    (ENGLISH, "kk", "en"),
    (KAZAKH, "ru", "kk"),                     # the Russian voice names the Kazakh letters one by one
    ("Мы поехали в Қарағанды.", "ru", "kk"),
    ("ПРИВЕТ", "EN", "ru"),
])
def test_an_explicit_language_that_does_not_fit_is_refused_naming_the_detected_one(text, language, detected):
    with pytest.raises(InvalidInputError) as info:
        resolve_language(text, language)
    err = info.value
    assert err.code == "language_mismatch" and err.status == 400
    names = {"ru": "Russian", "kk": "Kazakh", "en": "English"}
    assert names[detected] in str(err) and f"'{detected}'" in str(err)
    assert "auto" in str(err) and "allow_mismatch" in str(err)


@pytest.mark.parametrize("text, language", [(RUSSIAN, "en"), (KAZAKH, "en"), (ENGLISH, "ru"),
                                            (ENGLISH, "kk"), (KAZAKH, "ru")])
def test_a_mismatch_is_spoken_as_asked_when_allowed(text, language):
    assert resolve_language(text, language, allow_mismatch=True) == language


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("text", NO_LETTERS)
def test_an_explicit_language_is_kept_for_a_text_without_letters(text, language):
    assert resolve_language(text, language) == language


@pytest.mark.parametrize("language", ["de", "", "russian", "uk", "auto-detect", None, 7])
def test_unknown_languages_are_refused(language):
    with pytest.raises(InvalidInputError) as info:
        resolve_language(RUSSIAN, language)
    assert info.value.code == "unsupported_language" and info.value.status == 400
    assert "auto, ru, kk, en" in str(info.value)


# ------------------------------------------------------------------ validate_request
def test_validate_request_resolves_auto():
    assert validate_request(RUSSIAN, "auto") == (RUSSIAN, "ru")
    assert validate_request(KAZAKH, "Auto") == (KAZAKH, "kk")
    assert validate_request(ENGLISH, " auto ") == (ENGLISH, "en")
    assert validate_request("12345", "auto") == ("12345", "ru")


def test_validate_request_checks_the_script_only_when_asked():
    # Providers call it per sentence with the request's language: "Wi-Fi." in a Russian text.
    assert validate_request("Wi-Fi.", "ru") == ("Wi-Fi.", "ru")
    assert validate_request(RUSSIAN, "en") == (RUSSIAN, "en")
    with pytest.raises(InvalidInputError) as info:
        validate_request(RUSSIAN, "en", allow_mismatch=False)
    assert info.value.code == "language_mismatch"
    assert validate_request(RUSSIAN, "kk", allow_mismatch=False) == (RUSSIAN, "kk")
    assert validate_request(RUSSIAN, "auto", allow_mismatch=False) == (RUSSIAN, "ru")


@pytest.mark.parametrize("allow_mismatch", [True, False])
def test_validate_request_keeps_its_codes_for_bad_language_and_empty_text(allow_mismatch):
    with pytest.raises(InvalidInputError) as info:
        validate_request(RUSSIAN, "de", allow_mismatch=allow_mismatch)
    assert info.value.code == "unsupported_language"
    for empty in ("", "   ", None):
        with pytest.raises(InvalidInputError) as info:
            validate_request(empty, "auto", allow_mismatch=allow_mismatch)
        assert info.value.code == "empty_text" and str(info.value) == "the text is empty"
    with pytest.raises(InvalidInputError) as info:  # the language is checked first, as before
        validate_request("", "de", allow_mismatch=allow_mismatch)
    assert info.value.code == "unsupported_language"


# ------------------------------------------------------------------ the real espeak-ng
@pytest.fixture(scope="module")
def tts():
    from lipsync.tts.espeak import EspeakTTS

    return EspeakTTS().load()


def spoken(speech) -> list[str]:
    return [e.phoneme for e in speech.phonemes if not e.phoneme.startswith("_")]


@pytest.mark.parametrize("language, latin, cyrillic", [
    ("ru", "Купите iPhone сегодня.", "Купите айфон сегодня."),
    ("ru", "Подключите Wi-Fi сейчас.", "Подключите вай-фай сейчас."),
    ("kk", "Мен жаңа iPhone сатып алдым.", "Мен жаңа айфон сатып алдым."),
])
def test_a_latin_brand_name_in_a_cyrillic_sentence_is_said_not_spelled(tts, language, latin, cyrillic):
    """espeak-ng's ru and kk voices switch to English rules for a Latin word ("iPhone" ->
    aI f oU n): about as long as the word written in Cyrillic (1.79 s against 1.55 s for
    the first pair; the switch adds two short pauses), where letter names would take far
    longer ("i P h o n e", letter by letter: 2.36 s). So no transliteration is done."""
    with_latin = tts.synthesize(latin, resolve_language(latin, "auto"))
    in_cyrillic = tts.synthesize(cyrillic, language)
    assert resolve_language(latin, "auto") == language
    assert with_latin.duration < 1.25 * in_cyrillic.duration, (with_latin.duration, in_cyrillic.duration)
    names = spoken(with_latin)
    assert "aI" in names and "f" in names  # English "ai", "f": the word, not "ай пи эйч ..."
    spelled = tts.synthesize(latin.replace("iPhone", "i P h o n e").replace("Wi-Fi", "W i F i"), language)
    assert with_latin.duration < spelled.duration - 0.3, (with_latin.duration, spelled.duration)


def test_auto_avoids_the_english_voice_spelling_russian(tts):
    """Issue #17: "Привет, как дела?" took 3.9 s in the English voice (letter names), 1.5 s in
    the Russian one. "auto" picks the Russian voice."""
    text = "Привет, как дела?"
    auto = tts.synthesize(text, "auto")
    russian = tts.synthesize(text, "ru")
    spelled = tts.synthesize(text, "en")
    assert spoken(auto) == spoken(russian)
    assert abs(auto.duration - russian.duration) < 0.05
    assert auto.duration < 0.6 * spelled.duration
