"""The format warm-up: other questions only, answers the reward accepts, labels on the answers alone, a loss
that falls, and a model built once into the cache."""

import dataclasses
import importlib.util
import json

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
)
from tests.fixed_step import default_tokenizer
from tests.helpers import REPO_ROOT, tiny_policy

CONFIG = WarmupConfig()


def test_the_warmup_questions_are_other_questions_than_the_tasks():
    questions = warmup_questions(CONFIG)
    assert len(questions) == CONFIG.steps * CONFIG.batch_size == len({e.prompt for e in questions})
    assert CONFIG.task_seeds == (0, 1, 2)  # the leakage runs' seeds, each generating its own questions
    for seed in CONFIG.task_seeds:
        task_train = {e.prompt for e in generate_synthetic("mixed", "train", seed=seed)}
        task_test = {e.prompt for e in generate_synthetic("mixed", "test", seed=seed, size=800)}
        assert not {e.prompt for e in questions} & (task_train | task_test), seed
        assert not any(held_out_by(seed, e) for e in questions)
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


def test_the_taught_reasoning_recalls_the_fact_then_names_the_chosen_options_letter_and_text():
    questions = warmup_questions(CONFIG)
    example = next(e for e in questions if e.prompt.startswith("What is the capital of Japan?"))
    reasoning = well_formed_answer(example).split("</reasoning>")[0]
    assert reasoning == f"<reasoning>\nThe capital of Japan is Tokyo. The answer is {example.answer}: Tokyo.\n"
    assert f"\n{example.answer}: Tokyo\n" in example.prompt
    fictional = next(e for e in questions if kind_of(e) == "uninferable")  # no fact to recall: the option's line only
    text = option_texts(fictional.prompt)[fictional.answer]
    assert well_formed_answer(fictional).split("</reasoning>")[0] == (
        f"<reasoning>\nThe answer is {fictional.answer}: {text}.\n")


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
    (dict(generator_seed=2), "other questions"), (dict(kind="uninferable"), "kind='uninferable'"),
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


def test_a_build_of_another_recipe_or_other_settings_is_stale(tmp_path):
    assert stale_build(tmp_path, CONFIG) == ""  # no record: a model put there by hand is used as it is
    record = tmp_path / "warmup.json"
    record.write_text(json.dumps({"config": dataclasses.asdict(CONFIG)}))  # builds before the recipe was recorded
    assert stale_build(tmp_path, CONFIG) == f"by recipe 1, the current one is {RECIPE}"
    record.write_text(json.dumps({"recipe": RECIPE + 1, "config": dataclasses.asdict(CONFIG)}))
    assert f"recipe {RECIPE + 1}" in stale_build(tmp_path, CONFIG)
    record.write_text(json.dumps({"recipe": RECIPE, "config": dataclasses.asdict(CONFIG)}))
    assert stale_build(tmp_path, CONFIG) == ""
    assert "'steps': 5" in stale_build(tmp_path, dataclasses.replace(CONFIG, steps=5))


def test_an_inferable_warmup_trains_on_inferable_questions_only():
    config = WarmupConfig(kind="inferable")
    questions = warmup_questions(config)
    assert len(questions) == config.steps * config.batch_size
    assert {kind_of(e) for e in questions} == {"inferable"}
    assert not any(held_out_by(seed, e) for seed in config.task_seeds for e in questions)


def test_settings_added_since_a_build_take_their_defaults(tmp_path):
    recorded = {k: v for k, v in dataclasses.asdict(CONFIG).items() if k != "kind"}
    (tmp_path / "warmup.json").write_text(json.dumps({"recipe": RECIPE, "config": recorded}))
    assert stale_build(tmp_path, CONFIG) == ""
    assert "'kind': 'inferable'" in stale_build(tmp_path, dataclasses.replace(CONFIG, kind="inferable"))


def load_warmup_script():
    spec = importlib.util.spec_from_file_location("warmup_script", REPO_ROOT / "src" / "warmup.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_command_builds_variants_outside_the_cache_only(tmp_path, capsys):
    parse = load_warmup_script().parse
    assert parse([])[1] == CONFIG
    args, config = parse(["--kind", "inferable", "--lr", "1e-4", "--out", str(tmp_path / "v")])
    assert config == dataclasses.replace(CONFIG, kind="inferable", lr=1e-4) and args.out == tmp_path / "v"
    for argv, message in [
        (["--steps", "60"], "needs --out DIR"),
        (["--kind", "uninferable", "--out", str(tmp_path / "v")], "invalid choice: 'uninferable'"),
        (["--lr", "0", "--out", str(tmp_path / "v")], "lr=0.0 is invalid"),
        (["--out", str(tmp_path)], "exists"),
    ]:
        with pytest.raises(SystemExit):
            parse(argv)
        assert message in capsys.readouterr().err
