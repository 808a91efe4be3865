"""Tests for the synthetic questions: format, determinism, hold-out, correctness, and no signal in the letters."""

import math
import re
from collections import Counter
from functools import cache

import pytest

from demopsd.config.check import validate_config
from demopsd.config.sections import SyntheticData
from demopsd.data.loading import load_split
from demopsd.data.rewards import score_mcq
from demopsd.data.synthetic import (
    ANIMAL_SOUNDS,
    ANIMALS,
    CAPITALS,
    COLOUR_OF,
    COLOURS,
    DEFAULT_SIZES,
    INFERABLE_TEMPLATES,
    KINDS,
    OPPOSITES,
    THINGS,
    UNINFERABLE_TEMPLATES,
    fact_sentence,
    generate_synthetic,
    kind_of,
    with_article,
)
from demopsd.data.types import SYSTEM_PROMPT, option_letters

N = 2000  # items per split for the statistical checks
SE = math.sqrt(0.25 * 0.75 / N)  # standard error of an accuracy at chance (0.25) over N items
CHI2_3DOF_P001 = 16.27  # chi-square with 3 degrees of freedom, p = 0.001


@cache
def synthetic(kind, split, seed=0, size=None, letter_seed=None, balanced=False):
    return tuple(generate_synthetic(kind, split, seed=seed, size=size, letter_seed=letter_seed,
                                    balanced_letters=balanced))


def parse(prompt):
    """(question, {letter: option text}), parsed independently of the generator."""
    question, body = prompt.split("\n\n", 1)
    assert body.endswith("\nPlease reason step by step.")
    lines = body.removesuffix("\nPlease reason step by step.").split("\n")
    assert [line[:3] for line in lines] == ["A: ", "B: ", "C: ", "D: "]
    return question, {line[0]: line[3:] for line in lines}


def content(prompt):
    """The question line and its option set, whatever the letters."""
    question, options = parse(prompt)
    return question, frozenset(options.values())


# ------------------------------------------------------------------------------------------ format and API
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_format_sizes_and_idx(kind, split):
    examples = synthetic(kind, split)
    per_kind = DEFAULT_SIZES[split]
    assert len(examples) == (2 * per_kind if kind == "mixed" else per_kind)
    assert len({e.idx for e in examples}) == len(examples)
    for e in examples:
        question, options = parse(e.prompt)
        assert option_letters(e.prompt) == e.letters == "ABCD" and e.answer in e.letters
        assert e.system == SYSTEM_PROMPT
        assert len(set(options.values())) == 4 and question.endswith("?") and "\n" not in question
        assert ("fictional" in question) == (kind_of(e) == "uninferable")
        if kind != "mixed":
            assert kind_of(e) == kind
        completion = f"<reasoning>\n...\n</reasoning>\n<answer>\n{e.answer}\n</answer>"
        assert score_mcq(completion, e.answer, e.letters).reward == 1.0


def test_mixed_interleaves_the_two_kinds():
    mixed = synthetic("mixed", "train", size=7)
    assert [e.idx for e in mixed] == list(range(7))
    assert [kind_of(e) for e in mixed] == ["inferable", "uninferable"] * 3 + ["inferable"]
    assert list(mixed[0::2]) == list(synthetic("inferable", "train", size=4))
    assert list(mixed[1::2]) == list(synthetic("uninferable", "train", size=3))
    full = synthetic("mixed", "train")
    assert Counter(kind_of(e) for e in full) == {"inferable": 400, "uninferable": 400}


def test_a_smaller_size_is_a_prefix():
    for kind in KINDS:
        assert synthetic(kind, "test", size=10) == synthetic(kind, "test", size=60)[:10]


def test_determinism_per_seed():
    for kind in KINDS:
        assert generate_synthetic(kind, "train", seed=0, size=50) == list(synthetic(kind, "train", size=50))
        other = synthetic(kind, "train", seed=1, size=50)
        assert [e.prompt for e in other] != [e.prompt for e in synthetic(kind, "train", size=50)]
        assert len({e.prompt for e in other} & {e.prompt for e in synthetic(kind, "train", size=50)}) <= 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "easy", "split": "train"}, "unknown synthetic kind 'easy'; accepted: mixed, inferable, uninferable"),
        ({"kind": "mixed", "split": "validation"}, "unknown synthetic split 'validation'; accepted: train, test"),
        ({"kind": "mixed", "split": "train", "size": 0}, r"synthetic size=0 is invalid: an integer >= 1"),
        ({"kind": "mixed", "split": "train", "size": -3}, r"size=-3 is invalid"),
        ({"kind": "mixed", "split": "train", "size": True}, r"size=True is invalid"),
        ({"kind": "mixed", "split": "train", "size": "10"}, r"size='10' is invalid"),
    ],
)
def test_unknown_kind_split_or_size(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic(**kwargs)


# ------------------------------------------------------------------------------------------ hold-out
@pytest.mark.parametrize("seed", [0, 3])
def test_train_and_test_share_no_question(seed):
    for kind in ("inferable", "uninferable"):
        train, test = synthetic(kind, "train", seed, N), synthetic(kind, "test", seed, N)
        assert not {e.prompt for e in train} & {e.prompt for e in test}
        assert not {content(e.prompt) for e in train} & {content(e.prompt) for e in test}
        for examples in (train, test):  # no repeats within a split either
            assert len({content(e.prompt) for e in examples}) == N
        if kind == "uninferable":  # not even the fictional entity's question line comes back
            assert not {parse(e.prompt)[0] for e in train} & {parse(e.prompt)[0] for e in test}
            assert len({parse(e.prompt)[0] for e in test}) == N


# ------------------------------------------------------------------------------------------ inferable answers
CATEGORIES = {**ANIMALS, **THINGS}


def recompute(question, options):
    """The letters whose text answers ``question`` (from the text and the fact lists), and the template's name."""
    texts = set(options.values())
    if m := re.fullmatch(r"What is the capital of (.+)\?", question):
        assert texts <= set(CAPITALS.values())
        return "capital", [k for k, v in options.items() if v == CAPITALS[m[1]]]
    if m := re.fullmatch(r"What colour is (.+)\?", question):
        assert texts <= set(COLOURS)
        return "colour", [k for k, v in options.items() if v == COLOUR_OF[m[1]]]
    if m := re.fullmatch(r"Which animal says '(.+)'\?", question):
        assert texts <= set(ANIMAL_SOUNDS)
        return "sound", [k for k, v in options.items() if ANIMAL_SOUNDS[v] == m[1]]
    if m := re.fullmatch(r"Which word means the opposite of '(.+)'\?", question):
        opposite = {a: b for pair in OPPOSITES for a, b in (pair, pair[::-1])}
        assert texts <= set(opposite) and m[1] not in texts
        return "opposite", [k for k, v in options.items() if opposite[v] == m[1]]
    if question == "Which word comes first in alphabetical order?":
        assert len({v[0] for v in texts}) == 4  # distinct initials: the first letter decides
        return "alphabetical", [k for k, v in options.items() if v == min(options.values())]
    if m := re.fullmatch(r"Which (?:animal|of these) is an? (.+)\?", question):
        members = CATEGORIES[m[1]]
        assert all(any(v in words for words in CATEGORIES.values()) for v in options.values())
        return "category", [k for k, v in options.items() if v in members]
    raise AssertionError(f"no template matches {question!r}")


def test_fact_lists_are_unambiguous():
    """Each fact has one answer among any options: no two countries share a capital, no two animals a sound, no
    word is in two pairs of opposites, and every colour answer is one of the colour options."""
    assert len(set(CAPITALS.values())) == len(CAPITALS)
    assert len(set(ANIMAL_SOUNDS.values())) == len(ANIMAL_SOUNDS)
    words = [w for pair in OPPOSITES for w in pair]
    assert len(words) == len(set(words))
    assert set(COLOUR_OF.values()) <= set(COLOURS)


def test_category_lists_do_not_overlap():
    words = [w for members in CATEGORIES.values() for w in members]
    assert len(words) == len(set(words)) and all(re.fullmatch(r"[a-z]+", w) for w in words)


def test_inferable_answers_follow_from_the_text():
    seen = Counter()
    for split in ("train", "test"):
        for e in synthetic("inferable", split, 0, 1000):
            template, right = recompute(*parse(e.prompt))
            assert right == [e.answer], (template, e.prompt, e.answer)
            seen[template] += 1
    assert len(seen) == len(INFERABLE_TEMPLATES) and min(seen.values()) >= 150, seen


def test_the_fact_sentence_names_the_correct_option_and_no_other():
    seen = Counter()
    for e in synthetic("inferable", "test", 0, 600):
        question, options = parse(e.prompt)
        sentence = fact_sentence(e)
        named = {letter for letter, text in options.items() if re.search(rf"\b{re.escape(text)}\b", sentence)}
        assert named == {e.answer}, (e.prompt, sentence)
        assert re.fullmatch(r"['A-Z].*\.", sentence)
        seen[recompute(question, options)[0]] += 1
    assert len(seen) == len(INFERABLE_TEMPLATES), seen
    assert {fact_sentence(e) for e in synthetic("uninferable", "test", 0, 50)} == {""}


def test_fact_sentences_of_known_questions():
    by_question = {e.prompt.split("\n")[0]: e for e in synthetic("inferable", "train", 0, 1000)}
    cases = {
        "What is the capital of France?": "The capital of France is Paris.",
        "What colour is the sky on a clear day?": "The sky on a clear day is blue.",
        "Which animal says 'hoot'?": "An owl says 'hoot'.",
        "Which word means the opposite of 'hot'?": "The opposite of 'hot' is 'cold'.",
    }
    for question, sentence in cases.items():
        assert fact_sentence(by_question[question]) == sentence
    insect = by_question["Which animal is an insect?"]
    assert fact_sentence(insect) == f"{with_article(parse(insect.prompt)[1][insect.answer]).capitalize()} is an insect."
    assert [with_article(w) for w in ("insect", "owl", "bird", "umbrella")] == ["an insect", "an owl", "a bird",
                                                                             "an umbrella"]


# ------------------------------------------------------------------------------------------ letters
@pytest.mark.parametrize("kind", ["inferable", "uninferable"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_letters_are_balanced(kind, split):
    counts = Counter(e.answer for e in synthetic(kind, split, 0, N))
    chi2 = sum((counts[letter] - N / 4) ** 2 / (N / 4) for letter in "ABCD")
    assert chi2 < CHI2_3DOF_P001, counts


def test_another_letter_stream_keeps_the_texts_and_redraws_the_letters():
    for kind in ("inferable", "uninferable"):
        first, other = synthetic(kind, "test", 0, N), synthetic(kind, "test", 0, N, letter_seed=1)
        assert [content(e.prompt) for e in first] == [content(e.prompt) for e in other]
        if kind == "uninferable":  # the very same prompts, only the letter changes
            assert [e.prompt for e in first] == [e.prompt for e in other]
        same = sum(a.answer == b.answer for a, b in zip(first, other)) / N
        assert abs(same - 0.25) < 4 * SE, same  # independent draws agree by chance only


@pytest.mark.parametrize("kind", KINDS)
def test_balanced_letters_are_equally_many_in_every_first_multiple_of_four(kind):
    examples = synthetic(kind, "test", 0, 2000 if kind == "mixed" else 1000, balanced=True)
    for kind_examples in ([e for e in examples if kind_of(e) == k] for k in ("inferable", "uninferable")):
        if not kind_examples:
            continue
        for end in range(1, len(kind_examples) + 1):
            counts = Counter(e.answer for e in kind_examples[:end])
            if end % 4 == 0:
                assert set(counts.values()) == {end // 4}, (end, counts)
            assert max(counts.values()) - min(counts[letter] for letter in "ABCD") <= 1  # never more than one apart
    if kind == "mixed":  # 8m mixed items: 2m of each letter
        assert [Counter(e.answer for e in examples[:n]) for n in (8, 200)] == [dict.fromkeys("ABCD", 2),
                                                                            dict.fromkeys("ABCD", 50)]


def test_balanced_letters_move_the_correct_option_and_keep_every_text():
    for kind in ("inferable", "uninferable"):
        drawn, balanced = synthetic(kind, "test", 0, N), synthetic(kind, "test", 0, N, balanced=True)
        assert [content(e.prompt) for e in balanced] == [content(e.prompt) for e in drawn]
        assert [e.idx for e in balanced] == [e.idx for e in drawn]
        if kind == "uninferable":  # the very same prompts, only the letter changes
            assert [e.prompt for e in balanced] == [e.prompt for e in drawn]
        else:  # the correct text sits at its letter
            assert all(parse(e.prompt)[1][e.answer] == parse(d.prompt)[1][d.answer] for e, d in zip(balanced, drawn))
        same = sum(a.answer == b.answer for a, b in zip(drawn, balanced)) / N
        assert abs(same - 0.25) < 4 * SE, same  # the two letter streams agree by chance only
        other = synthetic(kind, "test", 0, N, letter_seed=1, balanced=True)
        same = sum(a.answer == b.answer for a, b in zip(other, balanced)) / N
        assert abs(same - 0.25) < 4 * SE, same  # so do two letter seeds
        runs = {tuple(e.answer for e in balanced[m : m + 4]) for m in range(0, N, 4)}
        assert len(runs) == 24  # every order of A-D comes up: the runs are shuffled, not one pattern repeated


def test_one_letter_scores_a_quarter_on_balanced_held_out_sets_and_nothing_else_finds_the_letter():
    """With balanced letters "always A" (or any letter) is right on exactly a quarter of the questions, and the text
    heuristics and the Naive Bayes below stay at chance on the uninferable ones."""
    for kind in ("inferable", "uninferable"):
        examples = synthetic(kind, "test", 0, N, balanced=True)
        for letter in "ABCD":
            assert sum(e.answer == letter for e in examples) == N // 4
    accuracies = heuristic_accuracies(synthetic("uninferable", "test", 0, N, balanced=True))
    assert all(abs(acc - 0.25) < 4 * SE for acc in accuracies.values()), accuracies
    _, test_acc = fit_and_score(synthetic("uninferable", "train", 0, N), synthetic("uninferable", "test", 0, N,
                                                                                   balanced=True))
    assert abs(test_acc - 0.25) < 4 * SE, test_acc


def _numeric(text):
    digits = re.sub(r"\D", "", text)
    return int(digits) if digits else -1


# Guesses from the text alone: each picks a letter by a feature of the options (or of the question).
HEURISTICS = {
    "always A": lambda q, o: "A",
    "smallest text": lambda q, o: min(o, key=lambda k: (o[k], k)),
    "largest text": lambda q, o: max(o, key=lambda k: (o[k], k)),
    "longest text": lambda q, o: max(o, key=lambda k: (len(o[k]), k)),
    "shortest text": lambda q, o: min(o, key=lambda k: (len(o[k]), k)),
    "largest number": lambda q, o: max(o, key=lambda k: (_numeric(o[k]), k)),
    "smallest number": lambda q, o: min(o, key=lambda k: (_numeric(o[k]), k)),
    "most letters shared with the question": lambda q, o: max(
        o, key=lambda k: (len(set(o[k].lower()) & set(q.lower())), k)
    ),
    "question length mod 4": lambda q, o: "ABCD"[len(q) % 4],
    "first letter of the name mod 4": lambda q, o: "ABCD"[ord(re.findall(r"[A-Z][a-z]+", q)[-1][0]) % 4],
}


def heuristic_accuracies(examples):
    parsed = [(parse(e.prompt), e.answer) for e in examples]
    return {
        name: sum(guess(q, o) == answer for (q, o), answer in parsed) / len(parsed)
        for name, guess in HEURISTICS.items()
    }


def test_simple_text_features_do_not_predict_the_uninferable_letter():
    for split in ("train", "test"):
        accuracies = heuristic_accuracies(synthetic("uninferable", split, 0, N))
        assert all(abs(acc - 0.25) < 4 * SE for acc in accuracies.values()), accuracies


def test_the_heuristics_do_find_signal_where_there_is_some():
    """Positive control: on inferable items the matching heuristic is right (the checks above can fail)."""
    examples = synthetic("inferable", "test", 0, N)
    alphabetical = [e for e in examples if parse(e.prompt)[0].endswith("in alphabetical order?")]
    assert len(alphabetical) > 100 and heuristic_accuracies(alphabetical)["smallest text"] == 1.0


# -- a bag-of-words Naive Bayes: question words, and option words tagged with their letter
def features(prompt):
    question, options = parse(prompt)
    words = [f"q:{w}" for w in re.findall(r"[a-z0-9]+", question.lower())]
    for letter, text in options.items():
        words += [f"{letter}:{w}" for w in re.findall(r"[a-z0-9]+", text.lower())]
        words += [f"{letter}:len{len(text)}"]
    return words


class NaiveBayes:
    """Multinomial Naive Bayes over letters with add-one smoothing."""

    def __init__(self, documents, labels):
        self.counts = {c: Counter() for c in "ABCD"}
        for words, label in zip(documents, labels):
            self.counts[label].update(words)
        self.vocab = set().union(*self.counts.values())
        self.totals = {c: sum(self.counts[c].values()) + len(self.vocab) for c in "ABCD"}
        self.prior = {c: math.log((labels.count(c) + 1) / (len(labels) + 4)) for c in "ABCD"}

    def predict(self, words):
        def score(c):
            return self.prior[c] + sum(
                math.log((self.counts[c][w] + 1) / self.totals[c]) for w in words if w in self.vocab
            )

        return max("ABCD", key=score)

    def accuracy(self, documents, labels):
        return sum(self.predict(words) == label for words, label in zip(documents, labels)) / len(labels)


def fit_and_score(train, test, label=lambda e: e.answer):
    model = NaiveBayes([features(e.prompt) for e in train], [label(e) for e in train])
    train_acc = model.accuracy([features(e.prompt) for e in train], [label(e) for e in train])
    return train_acc, model.accuracy([features(e.prompt) for e in test], [label(e) for e in test])


def test_naive_bayes_on_the_texts_scores_at_chance_on_held_out_uninferable_items():
    train, test = synthetic("uninferable", "train", 0, N), synthetic("uninferable", "test", 0, N)
    train_acc, test_acc = fit_and_score(train, test)
    assert train_acc > 0.5  # it can memorise the training items ...
    assert abs(test_acc - 0.25) < 4 * SE, test_acc  # ... and learns nothing that carries over


def test_naive_bayes_finds_a_planted_signal():
    """Positive control: were the letter a function of the template, the same model would find it."""
    train, test = synthetic("uninferable", "train", 0, N), synthetic("uninferable", "test", 0, N)
    markers = ("observatory", "kingdom", "island", "language", "Academy")  # one per template
    assert len(UNINFERABLE_TEMPLATES) == len(markers)

    def planted(e):
        question = parse(e.prompt)[0]
        return "ABCD"[[m in question for m in markers].index(True) % 4]

    _, test_acc = fit_and_score(train, test, planted)
    assert test_acc > 0.95


# ------------------------------------------------------------------------------------------ wiring
def test_load_split_dispatches_to_the_generator():
    data = SyntheticData(kind="uninferable", generator_seed=2, train_size=9, test_size=256)
    assert load_split(data, "train") == generate_synthetic("uninferable", "train", seed=2, size=9)
    assert load_split(data, "test") == list(synthetic("uninferable", "test", 2, 256, balanced=True))
    drawn = SyntheticData(kind="uninferable", generator_seed=2, balanced_letters=False)
    assert load_split(drawn, "test") == list(synthetic("uninferable", "test", 2))
    with pytest.raises(ValueError, match="unknown synthetic split 'dev'"):
        load_split(data, "dev")


@pytest.mark.parametrize("kind", KINDS)
def test_configs_compose_and_load(kind):
    from tests.test_config import compose_train

    cfg = compose_train([f"data=synthetic/{kind}", "~experiment"])
    assert (cfg.data.source, cfg.data.name, cfg.data.kind) == ("synthetic", f"synthetic-{kind}", kind)
    assert (cfg.data.generator_seed, cfg.data.train_size, cfg.data.test_size) == (0, None, None)
    assert (cfg.data.train_split, cfg.data.test_split, cfg.data.batch_size) == ("train", "test", 4)
    assert (cfg.data.max_prompt_tokens, cfg.data.num_workers) == (768, 0)
    assert cfg.data.balanced_letters  # the held-out letters balanced; the train split's drawn one by one
    data = validate_config(cfg).data
    assert load_split(data, data.test_split) == list(synthetic(kind, "test", balanced=True))
    assert load_split(data, data.train_split) == list(synthetic(kind, "train"))
