"""Text front end: normalization, espeak-ng phonemes and the symbol table.

The acoustic model reads one symbol per IPA character (the VITS convention), with stress marks, punctuation
and the word boundary as symbols of their own, so prosody cues from punctuation survive into the model.

Pipeline: ``normalize`` (ASCII, numbers and abbreviations spelled out, lower case, a fixed punctuation set)
-> ``phonemize`` (espeak-ng ``--ipa`` per punctuation-free chunk, punctuation re-inserted) -> ``text_to_ids``.
espeak-ng runs as a subprocess; many chunks go through one process (one chunk per line) because process
start-up, not phonemization, dominates when a corpus is prepared sentence by sentence.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..atomic import atomic_write

PAD, UNK, SPACE = "<pad>", "<unk>", " "
PUNCTUATION = ",.!?;:"
STRESS = "ˈˌ"
# Every character espeak-ng's English voices emit (lower-case ASCII letters are used as IPA too), plus the
# common IPA letters of other voices so a different espeak-ng version or voice degrades to rare <unk>s.
_IPA = (
    "abcdefghijklmnopqrstuvwxyz"
    "æçðøħŋœɐɑɒɓɔɕɖɗəɘɚɛɜɝɞɟɠɡɢɣɤɥɦɧɨɪɫɬɭɮɯɰɱɲɳɴɵɸɹɺɻɽɾʀʁʂʃʈʉʊʋʌʍʎʏʐʑʒʔʕʝʟβθχᵻ"
    "ːˑʰʲʷˠˤ˞ʼ\u0303\u0329\u032a\u030d"
)
SYMBOLS: list[str] = [PAD, UNK, *PUNCTUATION, *STRESS, *_IPA, SPACE]
SYMBOL_TO_ID: dict[str, int] = {s: i for i, s in enumerate(SYMBOLS)}
PAD_ID, UNK_ID = SYMBOL_TO_ID[PAD], SYMBOL_TO_ID[UNK]

# ----------------------------------------------------------------------------------------------- numbers

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
        if n:
            words.append(_ONES[n])
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_to_words(n: int) -> str:
    """Cardinal in words without "and" or hyphens ("one thousand two hundred thirty four").

    Numbers of 10**15 and above are read digit by digit, as people read long codes.
    """
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= 10**15:
        return digits_to_words(str(n))
    if n < 1000:
        return " ".join(_below_thousand(n))
    words: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            words += _below_thousand(n // value) + [name]
            n %= value
    if n:
        words += _below_thousand(n)
    return " ".join(words)


def digits_to_words(digits: str) -> str:
    """"007" -> "zero zero seven"."""
    return " ".join(_ONES[int(d)] for d in digits if d.isdigit())


def ordinal_to_words(n: int) -> str:
    """21 -> "twenty first", 100 -> "one hundredth"."""
    head, _, last = number_to_words(n).rpartition(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head} {last}".strip()


def year_to_words(n: int) -> str:
    """Read a year the way English speakers do: 1990 -> "nineteen ninety", 1905 -> "nineteen oh five"."""
    if not 1000 <= n <= 2099 or 2000 <= n < 2010 or n % 1000 == 0:
        return number_to_words(n)
    high, low = divmod(n, 100)
    if low == 0:
        return f"{number_to_words(high)} hundred"
    if low < 10:
        return f"{number_to_words(high)} oh {number_to_words(low)}"
    return f"{number_to_words(high)} {number_to_words(low)}"


# ------------------------------------------------------------------------------------------ abbreviations

# Expanded on the lower-case, tidied text (so "Dr ." and "DR." count too), only with the period, which the
# expansion consumes: the output never matches again and normalize stays idempotent. Words that are also
# common English words with a period after them ("sat.", "sun.", "mar.") are left out.
_ABBREVIATIONS = {
    "mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor", "prof": "professor", "jr": "junior",
    "sr": "senior", "gen": "general", "capt": "captain", "col": "colonel", "lt": "lieutenant",
    "sgt": "sergeant", "rev": "reverend", "hon": "honorable", "maj": "major", "gov": "governor",
    "mt": "mount", "ave": "avenue", "blvd": "boulevard", "rd": "road", "dept": "department",
    "co": "company", "corp": "corporation", "inc": "incorporated", "ltd": "limited", "etc": "et cetera",
    "vs": "versus", "approx": "approximately", "est": "established", "jan": "january", "feb": "february",
    "apr": "april", "aug": "august", "sept": "september", "oct": "october", "nov": "november",
    "dec": "december", "tue": "tuesday", "thur": "thursday", "thurs": "thursday", "fri": "friday",
    "st": "street",
}
_ABBREVIATION_RE = re.compile(r"\b(" + "|".join(sorted(_ABBREVIATIONS, key=len, reverse=True)) + r")\.")
_DOTTED = {"e.g.": "for example", "i.e.": "that is", "a.m.": "a m", "p.m.": "p m", "u.s.": "u s"}
_DOTTED_RE = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in _DOTTED) + r")", re.I)
# Titles written without a period ("Mr Smith") only before a capitalized name: lower-case output never matches.
_TITLE_RE = re.compile(r"\b(Mr|Mrs|Ms|Dr|Prof|St)\b(?=\s+[A-Z])")
_WORD_BEFORE_PERIOD = re.compile(r"[A-Za-z.]+$")


def abbreviation_before(text: str, period: int) -> bool:
    """Whether the period at `text[period]` closes an abbreviation that `normalize` expands ("Dr.", "e.g."), so
    that sentence splitting does not end a sentence there."""
    m = _WORD_BEFORE_PERIOD.search(text, max(0, period - 16), period + 1)
    if m is None:
        return False
    word = m.group().lower().lstrip(".")
    return word in _DOTTED or word[:-1] in _ABBREVIATIONS


_UNITS = {
    "km": "kilometers", "kg": "kilograms", "cm": "centimeters", "mm": "millimeters", "mg": "milligrams",
    "ml": "milliliters", "lb": "pounds", "lbs": "pounds", "oz": "ounces", "ft": "feet", "mph": "miles per hour",
    "kmh": "kilometers per hour", "km/h": "kilometers per hour", "hz": "hertz", "khz": "kilohertz",
    "kb": "kilobytes", "mb": "megabytes", "gb": "gigabytes",
}
_UNIT_RE = re.compile(r"(\d)\s?(" + "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True)) + r")\b",
                      re.I)
_ACRONYM_RE = re.compile(r"\b[B-DF-HJ-NP-TV-XZ]{2,5}\b")  # all-caps, no vowels: spelled ("BBC" -> "b b c")

# ---------------------------------------------------------------------------------------------- patterns

_CHAR_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": "-", "\u2014": " - ", "\u2015": " - ", "\u2212": "-", "\u2010": "-", "\u2011": "-",
    "\u2026": "...", "\u2044": "/", "\u00df": "ss", "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe",
    "\u0152": "OE", "\u00f8": "o", "\u00d8": "O", "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0110": "D",
    "\u00fe": "th", "\u00de": "Th", "\u00f0": "d", "\u00d0": "D", "\u0131": "i",
})
_SYMBOL_WORDS = [
    (re.compile(r"&"), " and "), (re.compile(r"@"), " at "), (re.compile(r"\+"), " plus "),
    (re.compile(r"="), " equals "), (re.compile(r"#\s?(?=\d)"), " number "), (re.compile(r"#"), " "),
    (re.compile(r"\bno\.\s?(?=\d)", re.I), "number "),
    (re.compile(r"°\s?C\b"), " degrees celsius"), (re.compile(r"°\s?F\b"), " degrees fahrenheit"),
    (re.compile(r"°"), " degrees"),
]
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents")}
_MONEY_RE = re.compile(r"([$£€])\s?(\d[\d,]*)(?:\.(\d{1,2}))?\b")
_TIME_RE = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_ORDINAL_RE = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.I)
_PERCENT_RE = re.compile(r"(\d)\s?%")
_THOUSANDS_RE = re.compile(r"\b\d{1,3}(?:,\d{3})+\b")
_DECIMAL_RE = re.compile(r"(\d*)\.(\d+)")
_FRACTION_RE = re.compile(r"\b(\d+)/(\d+)\b")
_RANGE_RE = re.compile(r"(\d)\s?-\s?(?=\d)")
_NEGATIVE_RE = re.compile(r"(?<![\w.])-(?=\d)")
_INTEGER_RE = re.compile(r"\d+")
_KEEP_RE = re.compile(r"[^a-z' ,.!?;:]+")


def _money(m: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[m.group(1)]
    whole = int(m.group(2).replace(",", "") or 0)
    cents = int((m.group(3) or "0").ljust(2, "0"))
    parts = []
    if whole or not cents:
        parts.append(f"{number_to_words(whole)} {one if whole == 1 else many}")
    if cents:
        parts.append(f"{number_to_words(cents)} {sub_one if cents == 1 else sub_many}")
    return " " + " and ".join(parts) + " "


def _time(m: re.Match[str]) -> str:
    hours, minutes = int(m.group(1)), int(m.group(2))
    if hours > 24 or minutes > 59:
        return f" {number_to_words(hours)} {number_to_words(minutes)} "
    if minutes == 0:
        return f" {number_to_words(hours)} o'clock "
    if minutes < 10:
        return f" {number_to_words(hours)} oh {number_to_words(minutes)} "
    return f" {number_to_words(hours)} {number_to_words(minutes)} "


def _integer_words(digits: str) -> str:
    if (len(digits) > 1 and digits[0] == "0") or len(digits) > 15:
        return f" {digits_to_words(digits)} "
    return f" {number_to_words(int(digits))} "


def _integer(m: re.Match[str]) -> str:
    digits = m.group(0)
    if len(digits) == 4 and 1100 <= int(digits) <= 2099 and digits[0] != "0":
        return f" {year_to_words(int(digits))} "
    return _integer_words(digits)


def _decimal(m: re.Match[str]) -> str:
    whole = m.group(1)
    head = number_to_words(int(whole)) if whole and len(whole) <= 15 else digits_to_words(whole or "0")
    return f" {head} point {digits_to_words(m.group(2))} "


def _expand_numbers(text: str) -> str:
    text = _MONEY_RE.sub(_money, text)
    text = _TIME_RE.sub(_time, text)
    text = _PERCENT_RE.sub(r"\1 percent", text)
    text = _ORDINAL_RE.sub(lambda m: f" {ordinal_to_words(int(m.group(1)[-15:]))} ", text)
    text = _THOUSANDS_RE.sub(lambda m: _integer_words(m.group(0).replace(",", "")), text)  # never a year
    text = _FRACTION_RE.sub(r"\1 over \2", text)
    text = _RANGE_RE.sub(r"\1 to ", text)
    text = _NEGATIVE_RE.sub("minus ", text)
    text = _DECIMAL_RE.sub(_decimal, text)
    return _INTEGER_RE.sub(_integer, text)


def _tidy(text: str) -> str:
    """Fix spacing and punctuation of a text over the final alphabet; a fixpoint, so normalize is idempotent."""
    text = re.sub(r"(?<![a-z])'+|'+(?![a-z])", " ", text)  # apostrophes only between letters
    text = re.sub(r"\s*([,.!?;:])\s*", r"\1 ", text)  # no space before, one after
    text = re.sub(r"([,.!?;:])(?:\s*[,.!?;:])+", lambda m: _strongest(m.group(0)), text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^[,.!?;:\s]+", "", text)  # no leading punctuation
    return re.sub(r"\s+([,.!?;:])", r"\1", text)


def _strongest(run: str) -> str:
    """Collapse a run of punctuation marks ("?!", ",.", "...") to the one that matters most for prosody."""
    for mark in "?!.;:,":
        if mark in run:
            return mark + " "
    return run


def normalize(text: str) -> str:
    """Spell out numbers, symbols and abbreviations; return lower-case ASCII words and ``,.!?;:`` only.

    Idempotent (``normalize(normalize(t)) == normalize(t)``) and total: any string is accepted, characters
    that cannot be spoken are dropped.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize() expects str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKD", text.translate(_CHAR_MAP))
    text = "".join(c for c in text if not unicodedata.combining(c)).translate(_CHAR_MAP)
    text = _DOTTED_RE.sub(lambda m: f" {_DOTTED[m.group(1).lower()]} ", text)
    text = _TITLE_RE.sub(lambda m: "saint" if m.group(1) == "St" else _ABBREVIATIONS[m.group(1).lower()], text)
    text = re.sub(r"\bSt\.(?=\s+[A-Z])", "saint", text)
    text = _UNIT_RE.sub(lambda m: f"{m.group(1)} {_UNITS[m.group(2).lower()]}", text)
    text = _ACRONYM_RE.sub(lambda m: " ".join(m.group(0)), text)
    for pattern, replacement in _SYMBOL_WORDS:
        text = pattern.sub(replacement, text)
    text = _expand_numbers(text).lower()
    text = re.sub(r"\.\.+", ".", text)
    text = re.sub(r"\s+-+\s+|--+", ", ", text)  # a spaced dash is a pause
    text = _tidy(_KEEP_RE.sub(" ", text))  # drops hyphens, quotes, brackets, other scripts
    # a sentence-final abbreviation keeps its period as the end of the sentence
    return _tidy(_ABBREVIATION_RE.sub(
        lambda m: _ABBREVIATIONS[m.group(1)] + ("." if m.end() == len(text) else ""), text))


# ------------------------------------------------------------------------------------------ phonemization

_CHUNK_RE = re.compile(r"([^,.!?;:]*)([,.!?;:]?)")
_LANG_SWITCH_RE = re.compile(r"\([a-z\-]+\)")


class EspeakMissingError(RuntimeError):
    """espeak-ng is not installed."""


def espeak_version(executable: str = "espeak-ng") -> str:
    """The ``espeak-ng --version`` line, recorded in meta.json because phonemes can differ between versions."""
    exe = _require_espeak(executable)
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at:")[0].strip()


_VOICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-/]{0,63}")


def is_voice_name(voice: str) -> bool:
    """Whether `voice` is shaped like an espeak-ng voice name (``en-us``, ``en+f3``, ``gmw/en-GB-x-rp``)."""
    return bool(_VOICE_RE.fullmatch(voice))


def _require_espeak(executable: str) -> str:
    path = shutil.which(executable)
    if path is None:
        raise EspeakMissingError(
            f"{executable!r} was not found on PATH. Install it with `sudo apt-get install espeak-ng` "
            "(or run `bittts prepare` as root, which installs it)."
        )
    return path


def _split_chunks(normalized: str) -> list[tuple[str, str]]:
    """"hi there, you." -> [("hi there", ","), ("you", ".")]; the chunks contain only [a-z' ]."""
    return [(m.group(1).strip(), m.group(2)) for m in _CHUNK_RE.finditer(normalized) if m.group(0).strip()]


def _clean_ipa(line: str) -> str:
    return re.sub(r"\s+", " ", _LANG_SWITCH_RE.sub("", line).replace("_", " ")).strip()


class Phonemizer:
    """espeak-ng IPA phonemizer with a per-sentence cache (optionally persisted as JSON).

    ``batch`` sends many chunks through one espeak-ng process, one per line, and checks that the output has
    one line per chunk; if espeak-ng ever splits a line, the affected batch falls back to one process per chunk.
    """

    def __init__(self, voice: str = "en-us", cache_path: str | os.PathLike[str] | None = None,
                 executable: str = "espeak-ng", batch_size: int = 500) -> None:
        self.voice, self.executable, self.batch_size = voice, executable, batch_size
        self.cache_path = os.fspath(cache_path) if cache_path is not None else None
        self.cache: dict[str, str] = {}
        if self.cache_path and os.path.exists(self.cache_path):
            with open(self.cache_path, encoding="utf-8") as f:
                self.cache = json.load(f)

    def __call__(self, text: str) -> str:
        return self.batch([text])[0]

    def batch(self, texts: Sequence[str], workers: int = 1) -> list[str]:
        """Phonemize many texts; ``workers`` espeak-ng processes run at once."""
        normalized = [normalize(t) for t in texts]
        todo = sorted({n for n in normalized if n not in self.cache})
        if todo:
            chunked = [_split_chunks(n) for n in todo]
            unique = sorted({c for chunks in chunked for c, _ in chunks if c})
            groups = [unique[i:i + self.batch_size] for i in range(0, len(unique), self.batch_size)]
            with ThreadPoolExecutor(max(1, workers)) as pool:
                results = list(pool.map(self._run_lines, groups))
            ipa = {c: p for group, res in zip(groups, results) for c, p in zip(group, res)}
            for n, chunks in zip(todo, chunked):
                self.cache[n] = " ".join(f"{ipa.get(c, '')}{punct}".strip() for c, punct in chunks
                                         if ipa.get(c) or punct).strip()
        return [self.cache[n] for n in normalized]

    def _run_lines(self, lines: list[str]) -> list[str]:
        exe = _require_espeak(self.executable)
        cmd = [exe, "-q", "--ipa", "-v", self.voice]
        run = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, encoding="utf-8")
        if run.returncode:
            detail = " ".join(run.stderr.split())[:200]
            raise ValueError(f"espeak-ng cannot phonemize with voice {self.voice!r} (exit {run.returncode}: "
                             f"{detail}); `espeak-ng --voices` lists the installed voices")
        out = run.stdout.splitlines()
        if len(out) == len(lines):
            return [_clean_ipa(line) for line in out]
        if len(lines) == 1:
            return [_clean_ipa(" ".join(out))]
        return [self._run_lines([line])[0] for line in lines]

    def save(self) -> None:
        """Write the cache atomically (no-op without ``cache_path``)."""
        if not self.cache_path:
            return
        atomic_write(self.cache_path, json.dumps(self.cache, ensure_ascii=False, sort_keys=True).encode("utf-8"))


@functools.lru_cache(maxsize=1)
def _default_phonemizer() -> Phonemizer:
    return Phonemizer()


def phonemize(text: str) -> str:
    """IPA phonemes with stress marks; words separated by spaces, punctuation kept ("hi, you." -> "hˈaɪ, jˈuː.")."""
    return _default_phonemizer()(text)


def phonemize_batch(texts: Iterable[str], workers: int = 1) -> list[str]:
    """``phonemize`` for many texts with few espeak-ng processes."""
    return _default_phonemizer().batch(list(texts), workers=workers)


def phonemes_to_ids(phonemes: str) -> list[int]:
    """One id per character; characters outside ``SYMBOLS`` become ``<unk>``."""
    return [SYMBOL_TO_ID.get(c, UNK_ID) for c in phonemes]


def ids_to_phonemes(ids: Iterable[int]) -> str:
    """Inverse of ``phonemes_to_ids`` for display; padding is dropped, unknown ids shown as ``<unk>``."""
    return "".join(SYMBOLS[i] if 1 < i < len(SYMBOLS) else (UNK if i != PAD_ID else "") for i in ids)


def text_to_ids(text: str) -> list[int]:
    """Raw text -> symbol ids (empty list when nothing in ``text`` can be spoken)."""
    return phonemes_to_ids(phonemize(text))
