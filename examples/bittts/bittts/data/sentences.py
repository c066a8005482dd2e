"""Deterministic English sentence generator: the text source of the offline training corpus.

Source and license: every sentence is produced by the templates and word lists in this file, written for
this project (same license as the project); nothing is copied from a corpus, so the text is license-clean
and needs no download. The generator is a seeded stream: ``generate_sentences(n, seed)`` returns the first
``n`` distinct sentences of that stream, so a longer corpus extends a shorter one with the same seed.

About thirty templates (statements, questions, exclamations, lists) fill slots from a vocabulary of a
few hundred nouns, verbs, adjectives, names and places, and deliberately include what the text normalizer
must handle: cardinals, ordinals, years, times, money, percentages, decimals, units and abbreviations
("Dr.", "Mrs.", "St.", "approx."), plus commas, semicolons, colons, questions and exclamations. Sentences
run about 6 to 16 words, roughly 2 to 4 seconds of speech.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

FIRST_NAMES = (
    "Alice Arthur Beatrice Benjamin Caroline Charles Daniel Deborah Edward Eleanor Frank Fiona George Grace "
    "Harold Helen Isaac Irene James Julia Kevin Katherine Lawrence Linda Martin Margaret Nathan Nora Oliver "
    "Olivia Patrick Paula Quentin Rachel Robert Rose Samuel Sarah Thomas Teresa Victor Vera Walter Wendy "
    "Henry Emma Lucas Mia Owen Clara Peter Anna Simon Laura Hugo Ruth Felix Ivy Dennis Megan Carl Joan"
).split()
SURNAMES = (
    "Adams Baker Carter Dawson Ellis Fisher Garcia Hughes Irving Jensen Keller Lambert Morgan Nolan Owens "
    "Parker Quinn Reed Sanders Turner Underwood Vaughn Walsh Young Brooks Chapman Foster Grant Harper "
    "Lawson Mitchell Porter Russell Spencer Tucker Warren Bennett Coleman Fletcher Holmes"
).split()
TITLES = ("Dr.", "Mr.", "Mrs.", "Ms.", "Prof.", "Capt.")
CITIES = (
    "Boston Denver Chicago Seattle Portland Dallas Atlanta Phoenix Detroit Houston London Paris Berlin Madrid "
    "Vienna Dublin Oslo Lisbon Toronto Sydney Tokyo Cairo Nairobi Lima Montreal Glasgow Edinburgh Geneva"
).split()
STREETS = "Main Oak Elm Maple Pine Cedar Park Lake Hill Church Market River Mill Spring".split()

NOUNS = [tuple(pair.split("/")) for pair in (
    "apple/apples basket/baskets bicycle/bicycles bird/birds blanket/blankets boat/boats book/books "
    "bottle/bottles box/boxes bridge/bridges brush/brushes bucket/buckets cake/cakes camera/cameras "
    "candle/candles car/cars carpet/carpets cat/cats chair/chairs clock/clocks cloud/clouds coat/coats "
    "coin/coins cup/cups desk/desks dog/dogs door/doors dress/dresses drum/drums engine/engines "
    "envelope/envelopes fence/fences field/fields flag/flags flower/flowers garden/gardens gate/gates "
    "glass/glasses glove/gloves guitar/guitars hammer/hammers hat/hats horse/horses house/houses "
    "island/islands jacket/jackets jar/jars kettle/kettles key/keys kite/kites ladder/ladders lamp/lamps "
    "letter/letters map/maps mirror/mirrors notebook/notebooks orange/oranges painting/paintings "
    "pencil/pencils piano/pianos picture/pictures pillow/pillows plate/plates pocket/pockets river/rivers "
    "road/roads rope/ropes ship/ships shoe/shoes shelf/shelves song/songs spoon/spoons stone/stones "
    "story/stories table/tables teacher/teachers ticket/tickets tower/towers train/trains tree/trees "
    "truck/trucks umbrella/umbrellas village/villages wagon/wagons wall/walls watch/watches window/windows "
    "farmer/farmers doctor/doctors sailor/sailors child/children student/students neighbor/neighbors "
    "baker/bakers driver/drivers singer/singers pilot/pilots nurse/nurses painter/painters "
    "rabbit/rabbits fox/foxes owl/owls goat/goats sheep/sheep duck/ducks mouse/mice wolf/wolves "
    "letterbox/letterboxes lantern/lanterns feather/feathers pebble/pebbles cookie/cookies "
    "sandwich/sandwiches radio/radios parcel/parcels recipe/recipes puzzle/puzzles violin/violins "
    "newspaper/newspapers suitcase/suitcases tent/tents wheel/wheels whistle/whistles shovel/shovels"
).split()]
ADJECTIVES = (
    "old young small large bright dark quiet loud warm cold heavy light soft hard smooth rough clean dirty "
    "empty full narrow wide tall short strange familiar careful gentle brave clever lazy busy happy "
    "tired hungry angry calm proud shy curious friendly lonely broken shiny dusty wooden golden silver "
    "green blue red yellow purple brown white black gray orange tiny enormous ancient modern famous "
    "simple fancy cheap expensive crowded peaceful muddy sunny rainy windy frozen fresh ripe sweet bitter"
).split()
PLACES = (
    "the kitchen", "the garden", "the station", "the library", "the market", "the harbor", "the museum",
    "the bakery", "the school", "the hospital", "the office", "the park", "the beach", "the forest",
    "the village square", "the old mill", "the bus stop", "the post office", "the river bank",
    "the top floor", "the back yard", "the train platform", "the city hall", "the little cafe",
    "the farm", "the hotel lobby", "the parking lot", "the bookshop", "the valley", "the mountain pass",
)
TIMES = (
    "this morning", "last night", "after lunch", "before dinner", "on Monday", "on Tuesday", "on Wednesday",
    "on Thursday", "on Friday", "on Saturday", "on Sunday", "at dawn", "at noon", "at midnight",
    "yesterday", "last week", "every evening", "in the spring", "in the summer", "in the autumn",
    "in the winter", "early today", "later that day", "the next morning", "once again",
)
MONTHS = ("January February March April May June July August September October November "
          "December").split()
# (base, third person, past) for verbs that take an object
VERBS_T = [tuple(v.split("/")) for v in (
    "carry/carries/carried paint/paints/painted clean/cleans/cleaned find/finds/found lose/loses/lost "
    "open/opens/opened close/closes/closed fix/fixes/fixed sell/sells/sold buy/buys/bought "
    "build/builds/built move/moves/moved lift/lifts/lifted push/pushes/pushed pull/pulls/pulled "
    "drop/drops/dropped hide/hides/hid watch/watches/watched follow/follows/followed borrow/borrows/borrowed "
    "wash/washes/washed bring/brings/brought take/takes/took send/sends/sent keep/keeps/kept "
    "check/checks/checked count/counts/counted draw/draws/drew catch/catches/caught throw/throws/threw "
    "fill/fills/filled mend/mends/mended pack/packs/packed polish/polishes/polished "
    "describe/describes/described remember/remembers/remembered notice/notices/noticed "
    "measure/measures/measured share/shares/shared deliver/delivers/delivered order/orders/ordered"
).split()]
# (base, past) for verbs without an object
VERBS_I = [tuple(v.split("/")) for v in (
    "laugh/laughed smile/smiled wait/waited listen/listened sing/sang dance/danced rest/rested "
    "shout/shouted whisper/whispered travel/traveled arrive/arrived leave/left sleep/slept work/worked "
    "run/ran walk/walked swim/swam cook/cooked read/read write/wrote study/studied"
).split()]
ADVERBS = (
    "slowly quickly quietly carefully happily suddenly gently loudly patiently politely nervously "
    "calmly eagerly proudly bravely softly"
).split()
FOODS = ("bread", "soup", "tea", "coffee", "rice", "cheese", "milk", "honey", "butter", "jam", "pie",
         "pasta", "salad", "fish", "beans", "lemonade")
WEATHER = ("rain", "snow", "wind", "fog", "sunshine", "thunder", "frost", "heat")
UNITS = ("km", "kg", "lbs", "ft", "miles", "meters", "liters", "minutes", "hours", "days")


def _ordinal(n: int) -> str:
    """21 -> "21st" (digits, so the normalizer's ordinal rule is exercised)."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class _Slots:
    """Random slot fillers drawn from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def pick(self, seq: Sequence[T]) -> T:
        return seq[self.r.randrange(len(seq))]

    def name(self) -> str:
        roll = self.r.random()
        if roll < 0.55:
            return self.pick(FIRST_NAMES)
        if roll < 0.8:
            return f"{self.pick(TITLES)} {self.pick(SURNAMES)}"
        return f"{self.pick(FIRST_NAMES)} {self.pick(SURNAMES)}"

    def noun(self) -> str:
        return self.pick(NOUNS)[0]

    def nouns(self) -> str:
        return self.pick(NOUNS)[1]

    def adj(self) -> str:
        return self.pick(ADJECTIVES)

    def np(self) -> str:
        """A noun phrase: "the old lamp", "a wooden box", "her brother's kite"."""
        roll = self.r.random()
        noun = self.noun()
        if roll < 0.4:
            return f"the {self.adj()} {noun}"
        if roll < 0.6:
            return _a(f"{self.adj()} {noun}")
        if roll < 0.8:
            return f"the {noun}"
        owner = self.pick(("her", "his", "their", "our", "my", "your"))
        return f"{owner} {self.adj()} {noun}"

    def count(self) -> str:
        n = self.r.choice((self.r.randint(2, 12), self.r.randint(13, 99), self.r.randint(100, 999)))
        return str(n)

    def year(self) -> str:
        return str(self.r.randint(1850, 2030))

    def date(self) -> str:
        return f"{self.pick(MONTHS)} {_ordinal(self.r.randint(1, 28))}"

    def clock(self) -> str:
        return f"{self.r.randint(1, 12)}:{self.pick(('00', '15', '30', '45', '05', '20', '50'))}"

    def money(self) -> str:
        dollars = self.r.choice((self.r.randint(1, 20), self.r.randint(21, 500)))
        return f"${dollars}" if self.r.random() < 0.4 else f"${dollars}.{self.r.randint(1, 99):02d}"


def _templates() -> list[Callable[[_Slots], str]]:
    """Each template maps slot fillers to one sentence."""
    return [
        lambda s: f"{s.name()} {s.pick(VERBS_T)[2]} {s.np()} {s.pick(TIMES)}.",
        lambda s: f"{s.name()} {s.pick(VERBS_T)[2]} {s.np()} near {s.pick(PLACES)}.",
        lambda s: f"{s.pick(TIMES).capitalize()}, {s.name()} {s.pick(VERBS_I)[1]} {s.pick(ADVERBS)} in {s.pick(PLACES)}.",
        lambda s: f"Did you see {s.np()} in {s.pick(PLACES)}?",
        lambda s: f"Why did {s.name()} {s.pick(VERBS_T)[0]} {s.np()} {s.pick(TIMES)}?",
        lambda s: f"Where is {s.np()} that {s.name()} {s.pick(VERBS_T)[2]}?",
        lambda s: f"The {s.noun()} was too {s.adj()}, so we {s.pick(VERBS_I)[1]} for a while.",
        lambda s: f"We bought {s.count()} {s.nouns()} for {s.money()} at {s.pick(PLACES)}.",
        lambda s: f"The train to {s.pick(CITIES)} leaves at {s.clock()} from platform {s.r.randint(1, 12)}.",
        lambda s: f"{s.name()} was born in {s.pick(CITIES)} in {s.year()}.",
        lambda s: f"On {s.date()}, {s.name()} {s.pick(VERBS_T)[2]} {s.np()}.",
        lambda s: f"About {s.r.randint(2, 99)}% of the {s.nouns()} in {s.pick(PLACES)} are {s.adj()}.",
        lambda s: f"The {s.noun()} weighs {s.r.randint(1, 90)}.{s.r.randint(1, 9)} {s.pick(UNITS[:3])}, approx.",
        lambda s: f"It is {s.r.randint(2, 400)} {s.pick(UNITS[3:6])} from {s.pick(CITIES)} to {s.pick(CITIES)}.",
        lambda s: f"{s.name()} lives at {s.r.randint(1, 250)} {s.pick(STREETS)} St., next to {s.pick(PLACES)}.",
        lambda s: f"What a {s.adj()} {s.noun()}!",
        lambda s: f"What a {s.adj()} day for {s.pick(WEATHER)}!",
        lambda s: f"Please {s.pick(VERBS_T)[0]} {s.np()} before {s.r.randint(1, 12)} o'clock.",
        lambda s: f"Don't {s.pick(VERBS_T)[0]} {s.np()}; {s.name()} needs it {s.pick(TIMES)}.",
        lambda s: f"{s.name()} asked for {s.pick(FOODS)}, {s.pick(FOODS)} and {s.pick(FOODS)}.",
        lambda s: f"The {s.adj()} {s.noun()} and the {s.adj()} {s.noun()} stood side by side.",
        lambda s: f"There were {s.count()} {s.nouns()} on {s.np()}.",
        lambda s: f"The {_ordinal(s.r.randint(1, 40))} {s.noun()} in the row is {s.adj()}.",
        lambda s: f"{s.name()} said that the {s.pick(WEATHER)} would stop {s.pick(TIMES)}.",
        lambda s: f"If the {s.pick(WEATHER)} stops, we will {s.pick(VERBS_I)[0]} in {s.pick(PLACES)}.",
        lambda s: f"You can {s.pick(VERBS_T)[0]} {s.np()}, but leave {s.np()} alone.",
        lambda s: f"{s.name()} {s.pick(VERBS_I)[1]} {s.pick(ADVERBS)} while {s.name()} {s.pick(VERBS_T)[2]} {s.np()}.",
        lambda s: f"Three things matter here: {s.adj()} {s.nouns()}, {s.adj()} {s.nouns()} and {s.pick(FOODS)}.",
        lambda s: f"Is {s.np()} really worth {s.money()}?",
        lambda s: f"In {s.year()}, the {s.nouns()} of {s.pick(CITIES)} were {s.adj()} and {s.adj()}.",
        lambda s: f"My {s.noun()} is {s.adj()}, and my {s.noun()} is even more {s.adj()}.",
        lambda s: f"Every {s.pick(TIMES).split()[-1]}, {s.name()} {s.pick(VERBS_T)[1]} {s.np()}.",
        lambda s: f"The meeting with {s.name()} starts at {s.clock()} in room {s.r.randint(100, 999)}.",
        lambda s: f"Somebody left {s.np()} and {s.np()} in {s.pick(PLACES)}.",
        lambda s: f"{s.name()} {s.pick(ADVERBS)} {s.pick(VERBS_T)[2]} the {s.r.randint(2, 60)} {s.nouns()}.",
        lambda s: f"Have you ever tried {s.pick(FOODS)} with {s.pick(FOODS)}?",
    ]


_TEMPLATES = _templates()


def iter_sentences(seed: int = 0) -> Iterator[str]:
    """An endless deterministic stream of distinct sentences."""
    rng = random.Random(seed)
    slots = _Slots(rng)
    seen: set[str] = set()
    while True:
        sentence = _TEMPLATES[rng.randrange(len(_TEMPLATES))](slots)
        sentence = sentence[0].upper() + sentence[1:]
        if sentence not in seen:
            seen.add(sentence)
            yield sentence


def generate_sentences(n: int, seed: int = 0) -> list[str]:
    """The first ``n`` sentences of ``iter_sentences(seed)``."""
    if n < 0:
        raise ValueError(f"number of sentences must be >= 0, got {n}")
    stream = iter_sentences(seed)
    return [next(stream) for _ in range(n)]
