"""Synthetic four-option questions, generated from a seed, on which leakage from the teacher shows.

Two kinds of question, in the SciKnowEval layout (question, blank line, ``A: ...`` to ``D: ...``,
"Please reason step by step."; system prompt ``SYSTEM_PROMPT``; scored by the same answer parser):

``inferable``
    The answer follows from the question and everyday knowledge (six templates: the capital of a country,
    the colour of a familiar thing, the animal that makes a sound, the opposite of a word, the word first in
    alphabetical order, the member of a category such as "Which animal is a mammal?"). The facts come from
    fixed lists, so a held-out question asks about a fact the train split also asks about, among other
    options: a student can learn these, and the default 135M model knows some of them before any training.
``uninferable``
    Facts about fictional places, people and words ("In the catalogue of the fictional observatory
    Vel-Ashar, which code is assigned to the star Korvath?") with four option texts drawn
    independently from the same distribution. The correct letter is drawn from its own random
    stream, independently of every character of the prompt, so nothing in a held-out question
    predicts it: any gain of the student on the test items of this kind is leakage or memorisation.

Determinism and hold-out. Item ``j`` of a kind and split draws its text from
``random.Random(f"{seed}:{split}:{kind}:text:{j}")`` and its letter from
``random.Random(f"{letter_seed}:{split}:{kind}:letter:{j}")`` (string seeds go through SHA-512, so the
items are the same on every machine and Python version; ``hash()`` is never used).

Balanced letters. With ``balanced_letters`` the letters come instead in runs of four: items ``4m`` to ``4m + 3``
of a kind take A, B, C and D once each, in the order ``random.Random(f"{letter_seed}:{split}:{kind}:letters:{m}")``
shuffles them to. Every prefix of a multiple of four items then has each letter equally often (a mixed set of
``8m`` items too, ``m`` of each letter per kind), so always answering one letter scores exactly 1/4; the letter
is still drawn apart from the text, so nothing in a question predicts it (the other three of its run do, which
no answer to a single question can use). The texts are those of independent draws. Whether a question
may appear in the train or the test split is fixed by SHA-256 of its content (the question line, plus
the sorted option texts for inferable items, which share question lines): a fifth of the content space
is test, the rest train, and each split rejects draws of the other's part. So train and test never
share a question, whatever the sizes; within a split no content repeats either.

Kinds and ``idx``. The ``j``-th inferable item of a split has ``idx = 2 * j`` and the ``j``-th
uninferable one ``idx = 2 * j + 1``, whichever kind was asked for; ``mixed`` of size ``n`` is the first
``n`` items of the interleaving (inferable first), so its ``idx`` runs ``0 .. n - 1`` and an item is the
same in ``mixed`` as in its own kind. ``kind_of(example)`` reads the kind back from the parity.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable

from demopsd.data.types import SYSTEM_PROMPT, MCQExample, option_texts

KINDS = ("mixed", "inferable", "uninferable")
SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 400, "test": 100}
"""Items per kind; ``mixed`` gets twice as many (half of each kind)."""
TEST_FRACTION = 0.2
"""The share of the question space held out for the test split."""
LETTERS = "ABCD"
_MAX_DRAWS = 10_000


def with_article(noun: str) -> str:
    """``noun`` after "a", or "an" before a vowel ("an insect")."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# ------------------------------------------------------------------------------------------ word lists
ANIMALS = {
    "mammal": ("dog", "cat", "horse", "cow", "whale", "rabbit", "elephant", "lion", "mouse", "goat",
               "dolphin", "bear", "monkey", "tiger", "sheep", "giraffe"),
    "bird": ("eagle", "sparrow", "penguin", "owl", "parrot", "crow", "duck", "pigeon", "robin", "swan",
             "ostrich", "hawk"),
    "fish": ("salmon", "trout", "shark", "tuna", "cod", "goldfish", "carp", "herring", "sardine", "mackerel"),
    "insect": ("ant", "bee", "beetle", "butterfly", "mosquito", "grasshopper", "ladybug", "wasp", "moth",
               "dragonfly", "termite"),
    "reptile": ("snake", "lizard", "turtle", "crocodile", "tortoise", "iguana", "alligator", "gecko"),
}
THINGS = {
    "fruit": ("apple", "banana", "grape", "mango", "pear", "strawberry", "pineapple", "watermelon", "kiwi",
              "papaya", "apricot"),
    "vegetable": ("carrot", "potato", "onion", "cabbage", "lettuce", "spinach", "broccoli", "celery",
                  "turnip", "radish", "leek"),
    "musical instrument": ("violin", "piano", "guitar", "flute", "trumpet", "drum", "cello", "harp",
                           "clarinet", "trombone", "saxophone", "banjo"),
    "tool": ("hammer", "wrench", "screwdriver", "chisel", "pliers", "shovel", "rake", "axe", "crowbar",
             "trowel"),
}
CATEGORY_QUESTIONS = {
    **{name: f"Which animal is {with_article(name)}?" for name in ANIMALS},
    **{name: f"Which of these is {with_article(name)}?" for name in THINGS},
}
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid",
    "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Thailand": "Bangkok",
    "Argentina": "Buenos Aires",
}
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "pink", "grey")
COLOUR_OF = {
    "grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow", "a ripe tomato": "red",
    "chocolate": "brown", "a lemon": "yellow", "milk": "white", "the sky on a clear day": "blue", "a carrot": "orange",
    "a flamingo": "pink", "a pumpkin": "orange", "a lime": "green", "an elephant": "grey", "a fire engine": "red",
    "an aubergine": "purple",
}
ANIMAL_SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "sheep": "baa", "duck": "quack", "pig": "oink", "lion": "roar",
    "owl": "hoot", "horse": "neigh", "bee": "buzz", "mouse": "squeak", "donkey": "hee-haw", "frog": "ribbit",
    "rooster": "cock-a-doodle-doo",
}
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("wet", "dry"), ("early", "late"), ("full", "empty"), ("high", "low"), ("rich", "poor"),
    ("strong", "weak"), ("long", "short"), ("loud", "quiet"), ("day", "night"), ("left", "right"), ("push", "pull"),
    ("win", "lose"), ("first", "last"), ("old", "young"), ("inside", "outside"), ("buy", "sell"),
)
"""Pairs of opposites; no word of one pair is an opposite of a word of another."""
WORDS = tuple(sorted({w for group in (ANIMALS, THINGS) for words in group.values() for w in words}))
"""The single words of the category lists: the pool of the alphabetical template."""

FICTION_NOUNS = ("river", "lantern", "mountain", "bread", "window", "feather", "stone", "winter", "mirror",
                 "harvest", "thread", "bridge", "candle", "shadow", "garden", "anchor", "forest", "kettle",
                 "silence", "thunder", "needle", "orchard", "ladder", "valley", "meadow", "storm", "honey",
                 "compass", "island", "basket")
FICTION_COLOURS = ("red", "blue", "green", "yellow", "purple", "white", "black", "grey", "brown", "pink",
                   "gold", "silver")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "kr", "dr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "th", "m")


# ------------------------------------------------------------------------------------------ public API
def generate_synthetic(
    kind: str, split: str, *, seed: int = 0, size: int | None = None, letter_seed: int | None = None,
    balanced_letters: bool = False,
) -> list[MCQExample]:
    """``size`` questions of ``kind`` ("mixed", "inferable", "uninferable") for ``split`` ("train", "test").

    ``size`` defaults to ``DEFAULT_SIZES[split]`` per kind (twice that for ``mixed``). ``letter_seed``
    (default ``seed``) seeds only the draw of the correct letters: another value keeps every question
    and option text and moves the correct option to an independently drawn letter. ``balanced_letters`` draws
    the letters in shuffled runs of A-D instead of one by one (see the module doc); the texts stay the same.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; accepted: {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; accepted: {', '.join(SPLITS)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"synthetic size={size!r} is invalid: an integer >= 1 is accepted (or None for the default)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"synthetic seed={seed!r} is invalid: an integer is accepted")
    letter_seed = seed if letter_seed is None else letter_seed
    if kind == "mixed":
        size = 2 * DEFAULT_SIZES[split] if size is None else size
        inferable = _items("inferable", split, seed, letter_seed, (size + 1) // 2, balanced_letters)
        uninferable = _items("uninferable", split, seed, letter_seed, size // 2, balanced_letters)
        interleaved = [e for pair in zip(inferable, uninferable) for e in pair] + inferable[len(uninferable):]
        return interleaved
    return _items(kind, split, seed, letter_seed, DEFAULT_SIZES[split] if size is None else size, balanced_letters)


def kind_of(example: MCQExample) -> str:
    """"inferable" or "uninferable" for an example of ``generate_synthetic`` (even ``idx``: inferable)."""
    return "inferable" if example.idx % 2 == 0 else "uninferable"


def split_of(seed: int, kind: str, key: str) -> str:
    """The split ("train" or "test") that may hold the question whose content is ``key`` (see the module doc)."""
    digest = hashlib.sha256(f"{seed}\0{kind}\0{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64 else "train"


def held_out_by(seed: int, example: MCQExample) -> bool:
    """Whether ``example`` (of any generator seed) is a question the task of ``seed`` keeps for its test split."""
    question, body = example.prompt.split("\n\n", 1)
    options = list(option_texts(body).values())
    kind = kind_of(example)
    return split_of(seed, kind, content_key(kind, question, options)) == "test"


def fact_sentence(example: MCQExample) -> str:
    """The fact an inferable question of :func:`generate_synthetic` asks about, stated with its correct option's text
    ("The capital of Egypt is Cairo."); "" for an uninferable question, whose answer no fact decides."""
    if kind_of(example) == "uninferable":
        return ""
    question = example.prompt.split("\n", 1)[0]
    answer = option_texts(example.prompt)[example.answer]
    for pattern, state in FACT_SENTENCES:
        if match := re.fullmatch(pattern, question):
            return state(*match.groups(), answer)
    raise ValueError(f"no fact sentence for the question {question!r}: not one of the inferable templates")


def content_key(kind: str, question: str, options: list[str]) -> str:
    """What makes a question distinct: its line, plus the sorted option texts for inferable items."""
    return question if kind == "uninferable" else "\n".join([question, *sorted(options)])


# ------------------------------------------------------------------------------------------ generation
def _items(kind: str, split: str, seed: int, letter_seed: int, count: int, balanced: bool) -> list[MCQExample]:
    seen: set[str] = set()
    examples = []
    for j in range(count):
        text_rng = random.Random(f"{seed}:{split}:{kind}:text:{j}")
        for _ in range(_MAX_DRAWS):
            question, correct, distractors = _draw(kind, text_rng)
            key = content_key(kind, question, [correct, *distractors])
            if key not in seen and split_of(seed, kind, key) == split:
                break
        else:  # pragma: no cover - the question spaces are far larger than any split
            raise RuntimeError(f"no new {kind} {split} question after {_MAX_DRAWS} draws (item {j})")
        seen.add(key)
        position = _letter_position(kind, split, letter_seed, j, balanced)
        if kind == "uninferable":
            # The four texts are i.i.d. draws; the letter only says which of them is called correct.
            options = [correct, *distractors]
        else:
            options = [*distractors[:position], correct, *distractors[position:]]
        body = "\n".join(f"{letter}: {text}" for letter, text in zip(LETTERS, options))
        prompt = f"{question}\n\n{body}\nPlease reason step by step."
        idx = 2 * j + (kind == "uninferable")
        examples.append(MCQExample(prompt, LETTERS[position], SYSTEM_PROMPT, idx, LETTERS))
    return examples


def _letter_position(kind: str, split: str, letter_seed: int, j: int, balanced: bool) -> int:
    """The index in ``LETTERS`` of item ``j``'s correct letter: drawn alone, or its place in a shuffled run of four."""
    if not balanced:
        return random.Random(f"{letter_seed}:{split}:{kind}:letter:{j}").randrange(len(LETTERS))
    positions = range(len(LETTERS))
    run = random.Random(f"{letter_seed}:{split}:{kind}:letters:{j // len(LETTERS)}").sample(positions, len(LETTERS))
    return run[j % len(LETTERS)]


def _draw(kind: str, rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, correct text, three distractors); for uninferable the four option texts in prompt order."""
    if kind == "inferable":
        return rng.choice(INFERABLE_TEMPLATES)(rng)
    question, options = rng.choice(UNINFERABLE_TEMPLATES)(rng)
    return question, options[0], options[1:]


# -- inferable templates: each returns (question, correct, distractors in a random order)
def _capital(rng):
    country = rng.choice(sorted(CAPITALS))
    others = [city for other, city in sorted(CAPITALS.items()) if other != country]
    return f"What is the capital of {country}?", CAPITALS[country], rng.sample(others, 3)


def _colour_of(rng):
    thing = rng.choice(sorted(COLOUR_OF))
    colour = COLOUR_OF[thing]
    return f"What colour is {thing}?", colour, rng.sample([c for c in COLOURS if c != colour], 3)


def _animal_sound(rng):
    animal = rng.choice(sorted(ANIMAL_SOUNDS))
    others = [a for a in sorted(ANIMAL_SOUNDS) if a != animal]
    return f"Which animal says '{ANIMAL_SOUNDS[animal]}'?", animal, rng.sample(others, 3)


def _opposite(rng):
    pair = rng.choice(OPPOSITES)
    word, opposite = pair if rng.random() < 0.5 else pair[::-1]
    others = [w for other in OPPOSITES if other != pair for w in other]
    return f"Which word means the opposite of '{word}'?", opposite, rng.sample(others, 3)


def _alphabetical(rng):
    by_initial: dict[str, list[str]] = {}
    for word in WORDS:
        by_initial.setdefault(word[0], []).append(word)
    initials = rng.sample(sorted(by_initial), 4)
    words = [rng.choice(by_initial[c]) for c in initials]
    correct = min(words)
    return "Which word comes first in alphabetical order?", correct, [w for w in words if w != correct]


def _category(rng):
    group = rng.choice((ANIMALS, THINGS))
    name = rng.choice(sorted(group))
    others = [w for other, words in sorted(group.items()) if other != name for w in words]
    return CATEGORY_QUESTIONS[name], rng.choice(group[name]), rng.sample(others, 3)


INFERABLE_TEMPLATES = (_capital, _colour_of, _animal_sound, _opposite, _alphabetical, _category)
FACT_SENTENCES = (
    (r"What is the capital of (.+)\?", lambda country, city: f"The capital of {country} is {city}."),
    (r"What colour is (.+)\?", lambda thing, colour: f"{thing[0].upper()}{thing[1:]} is {colour}."),
    (r"Which animal says '(.+)'\?", lambda sound, animal: f"{with_article(animal).capitalize()} says '{sound}'."),
    (r"Which word means the opposite of '(.+)'\?", lambda word, opposite: f"The opposite of '{word}' is '{opposite}'."),
    (r"Which word comes first in alphabetical order\?", lambda word: f"'{word}' comes first in alphabetical order."),
    (r"Which (?:animal|of these) is an? (.+)\?",
     lambda category, member: f"{with_article(member).capitalize()} is {with_article(category)}."),
)
"""(question pattern, its fact as a sentence of the pattern's groups and the correct option's text) for each of
:data:`INFERABLE_TEMPLATES`, in that order."""


# -- uninferable templates: each returns (question, four i.i.d. distinct option texts)
def _name(rng: random.Random) -> str:
    syllables = rng.randint(2, 3)
    syllable = lambda: rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)  # noqa: E731
    return "".join(syllable() for _ in range(syllables)).capitalize()


def _distinct(rng: random.Random, draw: Callable[[random.Random], str]) -> list[str]:
    options: list[str] = []
    while len(options) < 4:
        value = draw(rng)
        if value not in options:
            options.append(value)
    return options


def _star_code(rng):
    def code(r):
        return "".join(r.choices(string.ascii_uppercase, k=2)) + "-" + "".join(r.choices(string.digits, k=4))

    question = (f"In the catalogue of the fictional observatory Vel-Ashar, which code is assigned to the star "
                f"{_name(rng)}?")
    return question, _distinct(rng, code)


def _charter_year(rng):
    question = (f"In the chronicles of the fictional kingdom of Orvandel, in which year did the {_name(rng)} "
                f"guild receive its charter?")
    return question, _distinct(rng, lambda r: str(r.randint(1000, 1899)))


def _banner_colour(rng):
    question = f"On the fictional island of Meridune, what colour is the banner of the village of {_name(rng)}?"
    return question, _distinct(rng, lambda r: r.choice(FICTION_COLOURS))


def _word_meaning(rng):
    question = f"In the fictional language Quellish, what does the word '{_name(rng).lower()}' mean?"
    return question, _distinct(rng, lambda r: r.choice(FICTION_NOUNS))


def _room_number(rng):
    question = f"At the fictional Academy of Mirrowen, which room belongs to the scholar {_name(rng)} {_name(rng)}?"
    return question, _distinct(rng, lambda r: f"Room {r.randint(100, 999)}")


UNINFERABLE_TEMPLATES = (_star_code, _charter_year, _banner_colour, _word_meaning, _room_number)
