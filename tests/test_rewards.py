"""Tests for the strict multiple-choice answer parser."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from demopsd.rewards import MCQScore, parse_answer, score_mcq

RIGHT = MCQScore(reward=1.0, correct=True, well_formed=True, predicted="B")
MALFORMED = MCQScore(reward=0.0, correct=False, well_formed=False, predicted=None)


def wrong(letter: str) -> MCQScore:
    return MCQScore(reward=0.0, correct=False, well_formed=True, predicted=letter)


@pytest.mark.parametrize(
    "completion",
    [
        "<reasoning>\nB fits.\n</reasoning>\n<answer>\nB\n</answer>\n",
        "<answer>B</answer>",
        "<answer>  B \t</answer>",
        "Some chatter first. <reasoning>x</reasoning><answer>\nB\n</answer> trailing words",
        "<ANSWER>B</Answer>",
        "<answer >B</answer >",
    ],
)
def test_well_formed_correct(completion):
    assert score_mcq(completion, "B") == RIGHT


def test_well_formed_wrong():
    assert score_mcq("<reasoning>hmm</reasoning><answer>\nC\n</answer>", "B") == wrong("C")


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "The answer is B.",
        "<answer>B",  # unclosed
        "B</answer>",  # no opening tag
        "</answer>B<answer>",  # tags in the wrong order
        "<answer></answer>",  # empty
        "<answer>b</answer>",  # lower case
        "<answer>A: 0.8</answer>",  # option text after the letter
        "<answer>B: 1.4</answer>",
        "<answer>A or B</answer>",
        "<answer>AB</answer>",
        "<answer>(B)</answer>",
        "<answer>B.</answer>",
        "<answer>Option B</answer>",
        "<answer>E</answer>",  # not among the options
        "<answer>B</answer><answer>B</answer>",  # two blocks, even if both right
        "<answer>A</answer>\n<answer>B</answer>",
        "<answer>B</answer><ANSWER>C</ANSWER>",
        "<answer><answer>B</answer>",
        "<reasoning>I guess <answer>B</answer></reasoning>",  # inside the reasoning
        "<reasoning>no closing tag <answer>B</answer>",
        "<reasoning>maybe <answer>C</answer></reasoning><answer>B</answer>",
    ],
)
def test_malformed(completion):
    assert score_mcq(completion, "B") == MALFORMED


def test_letters_restrict_the_options():
    assert score_mcq("<answer>B</answer>", "B", letters="AB") == RIGHT
    assert score_mcq("<answer>C</answer>", "B", letters="AB") == MALFORMED
    assert parse_answer("<answer>C</answer>", letters="AB") is None


@pytest.mark.parametrize("answer", ["E", "b", "", "AB"])
def test_reference_outside_letters_is_an_error(answer):
    with pytest.raises(ValueError, match="not one of the option letters"):
        score_mcq("<answer>B</answer>", answer)


reasoning_text = st.text(st.characters(blacklist_characters="<>"), max_size=60)
letters = st.sampled_from("ABCD")


@given(reasoning=reasoning_text, predicted=letters, answer=letters, pad=st.sampled_from(["", "\n", " \n "]))
def test_well_formed_scores_correct_iff_letter_matches(reasoning, predicted, answer, pad):
    completion = f"<reasoning>{reasoning}</reasoning>\n<answer>{pad}{predicted}{pad}</answer>"
    score = score_mcq(completion, answer)
    assert score.well_formed and score.predicted == predicted
    assert score.correct == (predicted == answer) and score.reward == float(predicted == answer)


@given(completion=st.text(max_size=80), answer=letters)
def test_reward_is_consistent(completion, answer):
    score = score_mcq(completion, answer)
    assert score.reward == float(score.correct)
    assert score.correct <= score.well_formed
    assert (score.predicted is not None) == score.well_formed
