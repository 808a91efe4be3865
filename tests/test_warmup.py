"""The format warm-up: other questions only, answers the reward accepts, labels on the answers alone, a loss
that falls, and a model built once into the cache."""

import dataclasses
import json
import re

import pytest

from demopsd.data.rewards import REWARD_RULES, score_mcq
from demopsd.data.synthetic import generate_synthetic, held_out_by, kind_of
from demopsd.data.types import option_texts
from demopsd.runtime.models import WARMED_MODEL, cached_model_path, load_model_and_tokenizer
from demopsd.training.warmup import (
    RECIPE,
    WarmupConfig,
    build_warmed_model,
    format_warmup,
    stale_build,
    supervised_batch,
    warmup_questions,
    well_formed_answer,
    worked_step,
)
from tests.fixed_step import default_tokenizer
from tests.helpers import tiny_policy

CONFIG = WarmupConfig()


def test_the_warmup_questions_are_other_questions_than_the_tasks():
    questions = warmup_questions(CONFIG)
    assert len(questions) == CONFIG.steps * CONFIG.batch_size == len({e.prompt for e in questions})
    task_train = {e.prompt for e in generate_synthetic("mixed", "train", seed=CONFIG.task_seed)}
    task_test = {e.prompt for e in generate_synthetic("mixed", "test", seed=CONFIG.task_seed)}
    assert not {e.prompt for e in questions} & (task_train | task_test)
    assert not any(held_out_by(CONFIG.task_seed, e) for e in questions)
    assert {kind_of(e) for e in questions} == {"inferable", "uninferable"}


def test_held_out_by_matches_the_generators_split():
    assert all(held_out_by(0, e) for e in generate_synthetic("mixed", "test", seed=0, size=60))
    assert not any(held_out_by(0, e) for e in generate_synthetic("mixed", "train", seed=0, size=60))


@pytest.mark.parametrize("rule", REWARD_RULES)
def test_the_taught_answer_is_well_formed_and_correct_under_every_reward_rule(rule):
    for example in warmup_questions(CONFIG)[:40]:
        score = score_mcq(well_formed_answer(example), example.answer, example.letters, rule)
        assert score.well_formed and score.correct and score.reward == 1.0
        wrong = next(letter for letter in example.letters if letter != example.answer)
        assert score_mcq(well_formed_answer(dataclasses.replace(example, answer=wrong)), example.answer,
                         example.letters, rule).reward == 0.0


def test_labels_cover_the_answer_and_its_eos_only():
    tokenizer = default_tokenizer()
    examples = warmup_questions(CONFIG)[:3]
    ids, mask, labels = supervised_batch(tokenizer, examples)
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3
    for row, example in enumerate(examples):
        answer_ids = labels[row][labels[row] != -100]
        assert answer_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer_ids[:-1]) == well_formed_answer(example)
        first = int((labels[row] != -100).nonzero()[0])
        prompt = tokenizer.decode(ids[row, :first])
        assert prompt.endswith("assistant\n") and example.prompt in prompt
        assert int(mask[row].sum()) == first + len(answer_ids)  # right-padded, nothing after the EOS


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps=0"), (dict(batch_size=0), "batch_size=0"), (dict(lr=0.0), "lr=0.0"),
    (dict(generator_seed=0, task_seed=0), "other questions"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        WarmupConfig(**bad)


def test_the_loss_falls():
    tokenizer = default_tokenizer()
    policy = tiny_policy(tokenizer)
    losses = format_warmup(policy, tokenizer, WarmupConfig(steps=6, batch_size=2, lr=3e-3), progress=False)
    assert len(losses) == 6 and losses[-1] < 0.95 * losses[0], losses  # observed 15.5 -> 13.6


def test_a_built_model_is_read_from_the_cache_and_a_missing_one_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="src/warmup.py"):
        load_model_and_tokenizer(WARMED_MODEL, cache_dir=tmp_path)
    target = cached_model_path(WARMED_MODEL, tmp_path)
    target.mkdir(parents=True)
    assert build_warmed_model(tmp_path) == target  # present: not trained again
    assert list(target.iterdir()) == []


def test_every_inferable_question_is_worked_out_and_every_uninferable_one_only_named():
    pool = generate_synthetic("mixed", "train", seed=CONFIG.generator_seed, size=600)
    for example in pool:
        options = option_texts(example.prompt)
        reasoning = well_formed_answer(example).split("\n")[1]
        if kind_of(example) == "uninferable":
            assert reasoning == f"The answer is {options[example.answer]}."
        else:
            conclusion = re.split(r"[,:;] ", reasoning)[-1]  # the last clause names the chosen option
            assert not reasoning.startswith("The answer is")
            assert re.search(rf"(^| ){re.escape(options[example.answer])}[ .]", conclusion), reasoning


@pytest.mark.parametrize("question, options, correct, expected", [
    ("Which option is the sum of 17 and 16?", ["31", "35", "33", "30"], "33", "17 + 16 = 33."),
    ("Which option is 40 minus 25?", ["15", "12", "17", "19"], "15", "40 - 25 = 15."),
    ("Which number comes next in the sequence 2, 5, 8, 11?", ["12", "14", "15", "9"], "14",
     "The terms go up by 3, so 11 + 3 = 14."),
    ("Which of these numbers is the largest?", ["12", "88", "7", "45"], "88", "Of 12, 88, 7 and 45, the largest is 88."),
    ("Which of these numbers is even?", ["23", "72", "77", "93"], "72", "Of 23, 72, 77 and 93, 72 is even."),
    ("Which word has the fewest letters?", ["horse", "cat", "elephant", "mango"], "cat",
     "Lengths 5, 3, 8, 5, so the shortest is cat."),
    ("Which word comes first in alphabetical order?", ["lion", "bear", "pear", "kiwi"], "bear",
     "First letters: l, b, p, k; the first is bear."),
    ("Which animal is a mammal?", ["owl", "eagle", "elephant", "cod"], "elephant", "An elephant is a mammal."),
    ("Which of these is a tool?", ["harp", "axe", "kiwi", "leek"], "axe", "An axe is a tool."),
    ("On the fictional island of Meridune, what colour is the banner of the village of Kora?",
     ["red", "blue", "gold", "grey"], "blue", ""),
])
def test_the_worked_step(question, options, correct, expected):
    assert worked_step(question, options, correct) == expected


def test_the_worked_steps_are_right():
    """Each worked step's arithmetic or comparison, checked independently of how it was written."""
    for example in generate_synthetic("inferable", "train", seed=CONFIG.generator_seed, size=400):
        options = option_texts(example.prompt)
        reasoning = well_formed_answer(example).split("\n")[1]
        if match := re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\.", reasoning):
            a, sign, b, c = match.groups()
            assert int(c) == (int(a) + int(b) if sign == "+" else int(a) - int(b)) == int(options[example.answer])
        elif match := re.fullmatch(r"The terms go up by (\d+), so (\d+) \+ \d+ = (\d+)\.", reasoning):
            terms = [int(t) for t in re.findall(r"\d+", example.prompt.split("\n")[0])]
            assert int(match[1]) == terms[1] - terms[0] and int(match[3]) == terms[-1] + int(match[1])


def test_every_taught_answer_fits_the_laptop_jobs_response_budget():
    tokenizer = default_tokenizer()
    pool = generate_synthetic("mixed", "train", seed=CONFIG.generator_seed, size=2000)
    longest = max(len(tokenizer(well_formed_answer(e), add_special_tokens=False).input_ids) for e in pool)
    assert longest <= 48, longest  # rollout.max_new_tokens of experiment=leakage_laptop


def test_a_build_of_another_recipe_or_other_settings_is_stale(tmp_path):
    assert stale_build(tmp_path, CONFIG) == ""  # no record: a model put there by hand is used as it is
    record = tmp_path / "warmup.json"
    record.write_text(json.dumps({"config": dataclasses.asdict(CONFIG)}))
    assert "recipe 1" in stale_build(tmp_path, CONFIG)
    record.write_text(json.dumps({"recipe": RECIPE, "config": dataclasses.asdict(CONFIG)}))
    assert stale_build(tmp_path, CONFIG) == ""
    assert "'steps': 5" in stale_build(tmp_path, dataclasses.replace(CONFIG, steps=5))
