"""The three reward rules: the strict parser, and the SDPO reference's answer-tag (MCQ) and last-letter (GPQA) rules."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from demopsd.data.rewards import MCQScore, parse_answer, score_mcq

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
    assert score_mcq(completion, "B", rule="strict") == RIGHT


def test_well_formed_wrong():
    assert score_mcq("<reasoning>hmm</reasoning><answer>\nC\n</answer>", "B", rule="strict") == wrong("C")


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
    assert score_mcq(completion, "B", rule="strict") == MALFORMED


def test_letters_restrict_the_options():
    assert score_mcq("<answer>B</answer>", "B", letters="AB", rule="strict") == RIGHT
    assert score_mcq("<answer>C</answer>", "B", letters="AB", rule="strict") == MALFORMED
    assert parse_answer("<answer>C</answer>", letters="AB") is None


@pytest.mark.parametrize("answer", ["E", "b", "", "AB"])
def test_reference_outside_letters_is_an_error(answer):
    with pytest.raises(ValueError, match="not one of the option letters"):
        score_mcq("<answer>B</answer>", answer)


def test_unknown_rule_names_what_is_accepted():
    with pytest.raises(ValueError, match=r"data.reward='lenient' is invalid: one of \('answer_tag', 'last_letter', 'strict'\)"):
        score_mcq("<answer>B</answer>", "B", rule="lenient")


@pytest.mark.parametrize(
    "completion, reward, well_formed",
    [
        ("<reasoning>x</reasoning>\n<answer>\nB\n</answer>", 1.0, True),
        ("<reasoning>x</reasoning>\n<answer>\nB\n</answer>\n", 1.0, True),  # `$` also matches before a final newline
        ("<answer>B", 1.0, False),  # unclosed: the text to the end counts
        ("<answer>B\n\nMore words", 0.0, False),
        ("<answer>A</answer> then <answer>B</answer>", 1.0, True),  # the last block counts
        ("<answer>B</answer> then <answer>A</answer>", 0.0, True),
        ("<answer>B</answer> and more text", 1.0, False),  # right, but the text does not end with the block
        ("B", 1.0, False),  # no tag: the whole stripped text
        ("  B \n", 1.0, False),
        ("The answer is B.", 0.0, False),
        ("<answer>b</answer>", 0.0, False),  # case matters
        ("<ANSWER>B</ANSWER>", 0.0, False),  # the reference matches the lower-case tags only
        ("<answer>(B)</answer>", 0.0, False),
        ("<reasoning>I guess <answer>B</answer></reasoning>", 1.0, False),
    ],
)
def test_answer_tag_rule_is_the_references(completion, reward, well_formed):
    score = score_mcq(completion, "B", rule="answer_tag")
    assert (score.reward, score.well_formed) == (reward, well_formed)
    assert score.correct == (reward == 1.0)


@pytest.mark.parametrize(
    "completion, predicted, reward",
    [
        ("<answer>\nB\n</answer>", "B", 1.0),
        ("I think A, but it is b.", "B", 1.0),  # upper-cased, the last standalone letter
        ("B or C", "C", 0.0),
        ("a cell divides", "A", 0.0),  # the reference's rule reads the article "a" as option A
        ("ABBA", None, 0.0),  # no letter stands alone: the stripped text itself
        ("nothing here", None, 0.0),
    ],
)
def test_last_letter_rule_is_the_references_gpqa_rule(completion, predicted, reward):
    score = score_mcq(completion, "B", rule="last_letter")
    assert (score.predicted, score.reward, score.well_formed) == (predicted, reward, predicted is not None)


reasoning_text = st.text(st.characters(blacklist_characters="<>"), max_size=60)
letters = st.sampled_from("ABCD")


@given(reasoning=reasoning_text, predicted=letters, answer=letters, pad=st.sampled_from(["", "\n", " \n "]))
def test_well_formed_scores_correct_iff_letter_matches(reasoning, predicted, answer, pad):
    completion = f"<reasoning>{reasoning}</reasoning>\n<answer>{pad}{predicted}{pad}</answer>"
    score = score_mcq(completion, answer, rule="strict")
    assert score.well_formed and score.predicted == predicted
    assert score.correct == (predicted == answer) and score.reward == float(predicted == answer)


@given(completion=st.text(max_size=80), answer=letters)
def test_reward_is_consistent(completion, answer):
    score = score_mcq(completion, answer, rule="strict")
    assert score.reward == float(score.correct)
    assert score.correct <= score.well_formed
    assert (score.predicted is not None) == score.well_formed


@given(completion=st.text(max_size=80), answer=letters, rule=st.sampled_from(["answer_tag", "last_letter"]))
def test_lenient_rules_reward_exactly_a_prediction_equal_to_the_answer(completion, answer, rule):
    score = score_mcq(completion, answer, rule=rule)
    assert score.reward == float(score.correct) == float(score.predicted == answer)
