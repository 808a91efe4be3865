"""Tests for the teacher's privileged context (reprompting)."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from demopsd.config.settings import RepromptConfig, SettingError
from demopsd.training.reprompt import build_contexts, demonstration_fraction, teacher_prompt

PLAIN = RepromptConfig(demonstration_template="{solution}")


def test_failures_get_the_first_successful_sibling_and_successes_never_themselves():
    completions = ["f0", "s1", "f2", "s3", "f4", "f5", "s6", "f7"]
    rewards = [0, 1, 0, 1, 0, 0, 1, 0]
    contexts = build_contexts(completions, rewards, 4, PLAIN)
    # group 1: s1 and s3 succeed; s1 gets s3, s3 gets s1, failures get s1 (the first)
    assert contexts[:4] == ["s1", "s3", "s1", "s1"]
    # group 2: s6 is the lone success; it has no other success to learn from
    assert contexts[4:] == ["s6", "s6", None, "s6"]


def test_success_threshold_is_inclusive():
    contexts = build_contexts(["a", "b"], [0.5, 0.49], 2, PLAIN)
    assert contexts == [None, "a"]
    strict = dataclasses.replace(PLAIN, success_threshold=1.0)
    assert build_contexts(["a", "b"], [0.5, 1.0], 2, strict) == ["b", None]


def test_loners_and_groups_without_success_are_masked():
    assert build_contexts(["a", "b", "c"], [1, 1, 0], 1, PLAIN) == [None, None, None]
    assert build_contexts(["a", "b", "c"], [0, 0, 0], 3, PLAIN) == [None, None, None]


def test_the_reference_answer_is_the_fallback_after_a_demonstration():
    config = dataclasses.replace(PLAIN, use_reference_answer=True)
    contexts = build_contexts(["s0", "f1", "f2", "f3"], [1, 0, 0, 0], 2, config, answers=["A", "B"])
    assert contexts == ["The correct answer is A.", "s0", "The correct answer is B.", "The correct answer is B."]


def test_fallbacks_are_off_by_default():
    assert build_contexts(["f0", "f1"], [0, 0], 2, PLAIN, answers=["A"]) == [None, None]


def test_turning_demonstrations_off_removes_them():
    off = dataclasses.replace(PLAIN, use_demonstrations=False)
    assert build_contexts(["s0", "f1"], [1, 0], 2, PLAIN) == [None, "s0"]
    assert build_contexts(["s0", "f1"], [1, 0], 2, off) == [None, None]


def test_reference_answer_only_when_demonstrations_are_off():
    config = dataclasses.replace(PLAIN, use_demonstrations=False, use_reference_answer=True)
    contexts = build_contexts(["s0", "s1", "f2", "f3"], [1, 1, 0, 0], 2, config, answers=["D", "B"])
    assert contexts == ["The correct answer is D."] * 2 + ["The correct answer is B."] * 2


def test_thinking_is_removed_from_demonstrations():
    completion = "<think>secret\nplan</think>\n<reasoning>r</reasoning><answer>A</answer>"
    contexts = build_contexts([completion, "f"], [1, 0], 2, RepromptConfig())
    assert contexts[1] == "Correct solution:\n\n<reasoning>r</reasoning><answer>A</answer>"
    kept = dataclasses.replace(PLAIN, remove_thinking=False)
    assert build_contexts([completion, "f"], [1, 0], 2, kept)[1] == completion
    custom = dataclasses.replace(PLAIN, thinking_pattern=r"<reasoning>.*?</reasoning>")
    assert build_contexts([completion, "f"], [1, 0], 2, custom)[1] == "<think>secret\nplan</think>\n<answer>A</answer>"


# The reference's actor.yaml templates, as its YAML parser reads them (solution and feedback sections each
# begin with a newline); a demonstration is the decoded response as it is, trailing whitespace included.
REFERENCE_REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
REFERENCE_SOLUTION = "\nCorrect solution:\n\n{successful_previous_attempt}"


def test_teacher_prompt_is_the_references_reprompt_to_the_character():
    demonstration = "<reasoning>r</reasoning>\n<answer>\nB\n</answer>\n"
    contexts = build_contexts([demonstration, "x"], [1, 0], 2, RepromptConfig())
    prompt = "Q?\n\nA: 1\nB: 2\nPlease reason step by step."
    reference = REFERENCE_REPROMPT.format(
        prompt=prompt, solution=REFERENCE_SOLUTION.format(successful_previous_attempt=demonstration), feedback=""
    )
    assert teacher_prompt(prompt, contexts[1], RepromptConfig()) == reference
    custom = RepromptConfig(template="[{context}] {prompt}")
    assert teacher_prompt("Q {x}", "c", custom) == "[c] Q {x}"


def test_random_selection_is_seeded_and_stays_in_group():
    config = dataclasses.replace(PLAIN, selection="random", seed=3)
    completions = [f"r{i}" for i in range(16)]
    rewards = [1, 1, 1, 0] * 4
    first = build_contexts(completions, rewards, 4, config, step=7)
    assert first == build_contexts(completions, rewards, 4, config, step=7)
    steps = {tuple(build_contexts(completions, rewards, 4, config, step=s)) for s in range(10)}
    assert len(steps) > 1  # different steps draw different siblings
    reseeded = [build_contexts(completions, rewards, 4, dataclasses.replace(config, seed=s), step=7) for s in range(8)]
    assert any(contexts != first for contexts in reseeded)  # the seed changes the draw too
    for i, context in enumerate(first):
        j = int(context[1:])
        assert j != i and j // 4 == i // 4 and rewards[j] == 1


@given(
    rewards=st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=24),
    group_size=st.integers(1, 6),
    selection=st.sampled_from(["first", "random"]),
)
def test_contexts_come_from_successful_siblings(rewards, group_size, selection):
    rewards = rewards[: len(rewards) - len(rewards) % group_size] or [0.0] * group_size
    completions = [str(i) for i in range(len(rewards))]
    config = dataclasses.replace(PLAIN, selection=selection)
    for i, context in enumerate(build_contexts(completions, rewards, group_size, config)):
        group = range(i - i % group_size, i - i % group_size + group_size)
        has_sibling = any(rewards[j] == 1.0 for j in group if j != i)
        assert (context is not None) == has_sibling
        if context is not None:
            j = int(context)
            assert j != i and j in group and rewards[j] == 1.0


@given(
    rewards=st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=24),
    group_size=st.integers(1, 6),
    answers=st.booleans(),
)
def test_demonstration_fraction_counts_the_contexts_that_are_siblings_answers(rewards, group_size, answers):
    rewards = rewards[: len(rewards) - len(rewards) % group_size] or [0.0] * group_size
    config = dataclasses.replace(PLAIN, use_reference_answer=answers, answer_template="answer {answer}")
    contexts = build_contexts([str(i) for i in range(len(rewards))], rewards, group_size, config,
                              answers=["A"] * (len(rewards) // group_size))
    from_siblings = sum(c is not None and not c.startswith("answer") for c in contexts)
    assert demonstration_fraction(rewards, group_size, config) == from_siblings / len(rewards)
    assert demonstration_fraction(rewards, group_size, dataclasses.replace(config, use_demonstrations=False)) == 0


def test_demonstration_fraction_of_two_groups():
    # group 1: two successes, each the other's demonstration, and two failures shown one; group 2: one success
    assert demonstration_fraction([1, 1, 0, 0, 1, 0, 0, 0], 4, PLAIN) == (4 + 3) / 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(completions=["a", "b", "c"], rewards=[0, 0, 0], group_size=2), "group_size=2"),
        (dict(completions=["a"], rewards=[0], group_size=0), "group_size=0 must be an integer >= 1"),
        (dict(completions=["a", "b"], rewards=[0], group_size=1), "1 rewards for 2 completions"),
    ],
)
def test_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_contexts(config=PLAIN, **kwargs)


def test_reference_answer_fallback_needs_answers():
    config = dataclasses.replace(PLAIN, use_reference_answer=True)
    with pytest.raises(ValueError, match="one answer per group: got none for 1 groups"):
        build_contexts(["a", "b"], [0, 0], 2, config)


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        (dict(selection="best"), "one of ('first', 'random')"),
        (dict(template="{prompt} only"), "a text containing {prompt} and {context}"),
        (dict(demonstration_template="no slot"), "a text containing {solution}"),
    ],
)
def test_bad_config(kwargs, accepted):
    with pytest.raises(SettingError) as caught:
        RepromptConfig(**kwargs)
    [(name, value)] = kwargs.items()
    assert caught.value.problems == [(name, value, accepted)]
    assert f"method.reprompt.{name}={value!r} is invalid: {accepted} is accepted" == str(caught.value)


def test_every_broken_rule_is_reported_at_once():
    with pytest.raises(SettingError) as caught:
        RepromptConfig(selection="best", answer_template="no slot")
    assert [name for name, _, _ in caught.value.problems] == ["selection", "answer_template"]


# ------------------------------------------------------------------------------ teacher-prompt truncation
def test_teacher_prompts_are_cut_on_the_right_at_the_references_length_by_default():
    """``max_reprompt_len: 10240`` and ``reprompt_truncation: right`` of the reference's actor.yaml / sdpo.yaml."""
    config = RepromptConfig()
    assert (config.max_prompt_tokens, config.truncation) == (10240, "right")


@pytest.mark.parametrize(("key", "value", "accepted"), [
    ("max_prompt_tokens", 0, "null or an integer >= 1 is accepted"),
    ("truncation", "middle", "one of ('right', 'left', 'error') is accepted"),
])
def test_bad_truncation_settings_name_the_key_and_what_is_accepted(key, value, accepted):
    with pytest.raises(SettingError) as caught:
        RepromptConfig(**{key: value})
    assert str(caught.value) == f"method.reprompt.{key}={value!r} is invalid: {accepted}"


def test_truncation_keys_are_settings_of_the_composed_config():
    """``method.reprompt.max_prompt_tokens`` / ``truncation`` (RepromptConfig holds their defaults) pass the config
    check and reach the settings; a bad value stops the run before anything loads."""
    from demopsd.config.check import ConfigError, validate_config
    from tests.test_config import compose_train

    settings = validate_config(compose_train(["method=sdpo", "method.reprompt.max_prompt_tokens=null",
                                              "method.reprompt.truncation=left"]))
    assert (settings.method.reprompt.max_prompt_tokens, settings.method.reprompt.truncation) == (None, "left")
    default = validate_config(compose_train(["method=sdpo"])).method.reprompt
    assert (default.max_prompt_tokens, default.truncation) == (10240, "right")
    with pytest.raises(ConfigError, match=r"method.reprompt.truncation='middle'"):
        validate_config(compose_train(["method=sdpo", "method.reprompt.truncation=middle"]))


def test_the_placebo_gives_each_group_the_next_groups_contexts():
    """Three prompts of two rollouts, each group with one success: under the placebo every rollout's context is
    the demonstration of the next prompt (the last prompt's, the first's), never its own prompt's."""
    completions = ["first right", "first wrong", "second wrong", "second right", "third right", "third wrong"]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    real = build_contexts(completions, rewards, 2, RepromptConfig())
    placebo = build_contexts(completions, rewards, 2, RepromptConfig(placebo=True))
    assert [c and c.split()[-2] for c in real] == [None, "first", "second", None, None, "third"]
    assert [c and c.split()[-2] for c in placebo] == ["second", None, None, "third", None, "first"]
