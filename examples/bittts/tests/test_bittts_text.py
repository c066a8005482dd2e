"""Text front end: number/abbreviation normalization, espeak-ng phonemes, symbol table, sentence generator."""
from __future__ import annotations

import re
import shutil

import pytest
from bittts.data import text
from bittts.data.sentences import generate_sentences, iter_sentences
from bittts.data.text import (
    PAD_ID,
    SYMBOLS,
    UNK_ID,
    Phonemizer,
    normalize,
    number_to_words,
    ordinal_to_words,
    phonemes_to_ids,
    phonemize,
    text_to_ids,
    year_to_words,
)
from hypothesis import given, settings
from hypothesis import strategies as st

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (sudo apt-get install espeak-ng)")
ALPHABET = re.compile(r"^[a-z' ,.!?;:]*$")

# an independent reader of English number words, to check number_to_words by round trip
_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_SMALL.update({w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})
_SCALE = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}


def words_to_number(words: str) -> int:
    total = current = 0
    for w in words.split():
        if w in _SMALL:
            current += _SMALL[w]
        elif w == "hundred":
            current *= 100
        else:
            total += current * _SCALE[w]
            current = 0
    return total + current


def test_symbol_table_layout():
    assert len(SYMBOLS) == len(set(SYMBOLS))
    assert SYMBOLS[PAD_ID] == "<pad>" and PAD_ID == 0 and SYMBOLS[UNK_ID] == "<unk>" and UNK_ID == 1
    assert SYMBOLS[-1] == " "
    assert all(len(s) == 1 for s in SYMBOLS[2:])
    for mark in ",.!?;:ˈˌː":
        assert mark in SYMBOLS


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (21, "twenty one"), (100, "one hundred"),
    (101, "one hundred one"), (999, "nine hundred ninety nine"), (1000, "one thousand"),
    (1234, "one thousand two hundred thirty four"), (1000000, "one million"),
    (2000000017, "two billion seventeen"), (-5, "minus five"),
])
def test_number_to_words_known_values(n, words):
    assert number_to_words(n) == words


@settings(deadline=None, max_examples=200)
@given(st.integers(min_value=0, max_value=10**15 - 1))
def test_number_to_words_round_trips(n):
    words = number_to_words(n)
    assert ALPHABET.match(words) and "  " not in words
    assert words_to_number(words) == n


@pytest.mark.parametrize("n, words", [(1, "first"), (2, "second"), (3, "third"), (5, "fifth"), (12, "twelfth"),
                                      (20, "twentieth"), (21, "twenty first"), (100, "one hundredth")])
def test_ordinals(n, words):
    assert ordinal_to_words(n) == words


@pytest.mark.parametrize("n, words", [(1990, "nineteen ninety"), (1905, "nineteen oh five"),
                                      (1900, "nineteen hundred"), (2005, "two thousand five"),
                                      (2024, "twenty twenty four"), (2000, "two thousand")])
def test_years(n, words):
    assert year_to_words(n) == words


@settings(deadline=None, max_examples=150)
@given(st.integers(min_value=0, max_value=10**15 - 1))
def test_numbers_in_text_expand_to_words(n):
    out = normalize(f"I counted {n} birds.")
    assert not re.search(r"\d", out)
    assert out.startswith("i counted ") and out.endswith(" birds.")
    spoken = out[len("i counted "):-len(" birds.")]
    if len(str(n)) != 4 or not 1100 <= n <= 2099:  # 4-digit numbers in that range are read as years
        assert words_to_number(spoken) == n


@pytest.mark.parametrize("raw, expected", [
    ("Dr. Smith paid $3.50.", "doctor smith paid three dollars and fifty cents."),
    ("Meet me at 9:05 on Jan. 3rd!", "meet me at nine oh five on january third!"),
    ("It is 25% off; approx. 1,200 left?", "it is twenty five percent off; approximately one thousand two hundred left?"),
    ("St. Louis is on Main St.", "saint louis is on main street."),
    ("Mrs. O'Brien & Mr Jones watched the BBC.", "missus o'brien and mister jones watched the b b c."),
    ("It weighs 3.5 kg -- maybe more...", "it weighs three point five kilograms, maybe more."),
    ("Café «naïve» — Straße", "cafe naive, strasse"),
    ("  ", ""),
])
def test_normalize_known_cases(raw, expected):
    assert normalize(raw) == expected


_TOKENS = ["Dr.", "St.", "st", ".", ",", "!", "?", "...", "--", "-", "'", "$", "%", "#", "5", "12", "1990", "3.5",
           "1,000", "9:30", "2nd", "no.", "Mr", "BBC", "km", " ", "the", "Anna", "é", "ß", "½", "…", "&", "(", ")",
           "\"", ";", ":", "/", "°C", "e.g.", "0", "007", "\n", "\t"]
texts = st.one_of(st.text(max_size=60), st.lists(st.sampled_from(_TOKENS), max_size=25).map("".join),
                  st.lists(st.sampled_from(_TOKENS), max_size=25).map(" ".join))


@settings(deadline=None, max_examples=400)
@given(texts)
def test_normalize_is_total_idempotent_and_in_alphabet(raw):
    out = normalize(raw)
    assert ALPHABET.match(out), out
    assert out == out.strip() and "  " not in out
    assert normalize(out) == out


def test_normalize_rejects_non_strings():
    with pytest.raises(TypeError, match="expects str"):
        normalize(42)  # type: ignore[arg-type]


@needs_espeak
def test_phonemize_keeps_punctuation_and_stress():
    out = phonemize("Hello world, how are you?")
    assert "," in out and out.endswith("?")
    assert "ˈ" in out
    assert out.count(" ") >= 3
    assert all(c in text.SYMBOL_TO_ID for c in out)


@needs_espeak
def test_phonemizer_batch_matches_single_calls_and_caches(tmp_path):
    sentences = ["The cat sat.", "Dr. Brown has 3 dogs!", "Where is it; who knows?", "", "Hi, you."]
    cache = tmp_path / "phonemes.json"
    ph = Phonemizer(cache_path=cache)
    batch = ph.batch(sentences, workers=2)
    singles = [Phonemizer()(s) for s in sentences]
    assert batch == singles
    assert batch[3] == ""
    ph.save()
    again = Phonemizer(cache_path=cache)
    assert again.cache == ph.cache and again.batch(sentences) == batch


@needs_espeak
def test_phonemizer_missing_executable_is_a_clear_error():
    with pytest.raises(text.EspeakMissingError, match="apt-get install espeak-ng"):
        Phonemizer(executable="espeak-ng-does-not-exist")("hello")


def test_phonemes_to_ids_maps_unknown_to_unk():
    assert phonemes_to_ids("a€b") == [text.SYMBOL_TO_ID["a"], UNK_ID, text.SYMBOL_TO_ID["b"]]
    assert text.ids_to_phonemes(phonemes_to_ids("həlˈoʊ, wˈɜːld.")) == "həlˈoʊ, wˈɜːld."


@needs_espeak
@settings(deadline=None, max_examples=25)
@given(st.text(max_size=40))
def test_text_to_ids_never_crashes(raw):
    ids = text_to_ids(raw)
    assert all(isinstance(i, int) and 0 < i < len(SYMBOLS) for i in ids)
    assert (ids == []) == (normalize(raw) == "")


def test_sentence_generator_is_deterministic_distinct_and_prefix_stable():
    first = generate_sentences(3000, seed=0)
    assert len(set(first)) == 3000
    assert first[:100] == generate_sentences(100, seed=0)
    assert generate_sentences(50, seed=1) != first[:50]
    stream = iter_sentences(0)
    assert [next(stream) for _ in range(10)] == first[:10]
    words = [len(normalize(s).split()) for s in first]
    assert 8 <= sum(words) / len(words) <= 16  # about 2.5-4 s of speech each
    assert min(words) >= 3
    joined = " ".join(first)
    for feature in ("$", "%", "Dr.", "St.", "?", "!", ";", ":", "th "):
        assert feature in joined, feature
