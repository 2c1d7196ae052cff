"""Which language a text is written in, and which voice speaks it (issue #17).

A request's ``language`` is ``"auto"`` or one of ``LANGUAGES`` (``ru``, ``kk``, ``en``).

``detect_language`` counts the letters of the text by script:

* Latin letters (``A-Z a-z``, Latin-1, Latin Extended-A/B and Additional: ``café``,
  ``Müller``) vote for ``en``;
* Cyrillic letters vote for Russian or Kazakh: ``kk`` as soon as one of the letters
  only Kazakh has (``KAZAKH_LETTERS``: ә ғ қ ң ө ұ ү һ і, either case) appears, else ``ru``.
  One is enough: the Russian voice cannot read those letters and names them instead
  ("Мы поехали в Қарағанды." lasts 4.2 s in the ``ru`` voice, 2.1 s in ``kk``), while
  the Kazakh voice reads Russian words with a light accent, never letter by letter.

The script with more letters wins; a tie goes to Cyrillic, because espeak-ng's ``ru`` and
``kk`` voices speak a Latin word ("iPhone", "Wi-Fi") with English rules, while the ``en``
voice spells every Cyrillic letter out by its name ("Привет, как дела?" 3.9 s in ``en``,
1.5 s in ``ru``). Digits, punctuation, emoji, spaces and letters of other scripts (Greek,
Arabic, CJK: none of our voices reads them) are not counted; a text without a single
Latin or Cyrillic letter has no language (``None``).

``resolve_language`` turns a request's ``language`` into the voice to use:

* ``"auto"``: the detected language; ``DEFAULT_LANGUAGE`` (``ru``, what an omitted
  ``language`` means) when the text has no letters ("12345", "😀", "?!"): digits and emoji
  are read in every voice, and the service's default is the least surprising choice.
* an explicit language is checked against the text's script; a text whose letters are
  mostly of another script is refused with ``InvalidInputError`` code
  ``language_mismatch`` (400), naming the detected language, unless
  ``allow_mismatch=True`` (a deliberate accent: "Привет" said by the English voice).
  What fits: ``en`` a Latin text; ``kk`` any Cyrillic text (Kazakh's alphabet holds
  all the Russian letters); ``ru`` a Cyrillic text without Kazakh-only letters (the
  Russian voice names those letters instead of reading them, see above).
  A text without letters fits every language: it is spoken as asked.

The page (``static/app.js``, ``detectLanguage``) applies the same letter rules as they
type; ``tests/test_page.py`` checks that both agree.
"""

from __future__ import annotations

from lipsync.errors import InvalidInputError
from lipsync.tts.base import AUTO, DEFAULT_LANGUAGE, LANGUAGE_CHOICES

# The letters of the Kazakh alphabet that Russian does not have (upper and lower case).
KAZAKH_LETTERS = frozenset("ӘәҒғҚқҢңӨөҰұҮүҺһІі")
# Code point ranges (inclusive) whose letters count for each script. static/app.js has the same.
LATIN_RANGES = ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF))
CYRILLIC_RANGES = ((0x0400, 0x052F),)

LANGUAGE_NAMES = {"ru": "Russian", "kk": "Kazakh", "en": "English"}
# For each explicit language, the detected languages whose texts it speaks without refusing.
FITS = {"ru": frozenset({"ru"}), "kk": frozenset({"kk", "ru"}), "en": frozenset({"en"})}


def _in(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= code <= high for low, high in ranges)


def detect_language(text: str) -> str | None:
    """The language ``text`` is written in: ``"kk"``, ``"ru"``, ``"en"``, or ``None`` without letters.

    Latin letters against Cyrillic letters, the majority wins (a tie goes to Cyrillic);
    Cyrillic is ``kk`` when any Kazakh-only letter (``KAZAKH_LETTERS``) is among them.
    Letters are counted in either case; anything but Latin and Cyrillic letters is ignored.
    """
    latin = cyrillic = kazakh = 0
    for char in text:
        if not char.isalpha():
            continue
        code = ord(char)
        if _in(code, LATIN_RANGES):
            latin += 1
        elif _in(code, CYRILLIC_RANGES):
            cyrillic += 1
            kazakh += char in KAZAKH_LETTERS
    if not latin and not cyrillic:
        return None
    if latin > cyrillic:
        return "en"
    return "kk" if kazakh else "ru"


def normalize_language(language) -> str:
    """``language`` trimmed and lower-cased (``" EN "`` -> ``"en"``); refused with
    ``InvalidInputError`` code ``unsupported_language`` unless it is one of ``LANGUAGE_CHOICES``."""
    lang = language.strip().lower() if isinstance(language, str) else ""
    if lang not in LANGUAGE_CHOICES:
        raise InvalidInputError(f"unsupported language {language!r}: use one of {', '.join(LANGUAGE_CHOICES)}",
                                code="unsupported_language")
    return lang


def resolve_language(text: str, language, *, allow_mismatch: bool = False) -> str:
    """The language to speak ``text`` in: one of ``LANGUAGES``.

    ``language``: ``"auto"`` or a language code, in any case, with spaces around allowed.
    ``"auto"`` gives ``detect_language(text)``, or ``DEFAULT_LANGUAGE`` for a text
    without letters. An explicit language is returned as it is when the text fits it
    (see the module's docstring), has no letters, or ``allow_mismatch`` is true; otherwise
    ``InvalidInputError`` code ``language_mismatch`` (400) names the detected language.
    An unknown ``language`` raises ``InvalidInputError`` code ``unsupported_language``.
    """
    lang = normalize_language(language)
    detected = detect_language(text)
    if lang == AUTO:
        return detected or DEFAULT_LANGUAGE
    if allow_mismatch or detected is None or detected in FITS[lang]:
        return lang
    raise InvalidInputError(
        f"the text is written in {LANGUAGE_NAMES[detected]} ({detected}), but 'language' is {lang!r}: "
        f"send 'language': {detected!r} or 'auto', or 'allow_mismatch': true to speak it with the "
        f"{LANGUAGE_NAMES[lang]} voice anyway", code="language_mismatch")


__all__ = ["KAZAKH_LETTERS", "LANGUAGE_NAMES", "detect_language", "normalize_language", "resolve_language"]
