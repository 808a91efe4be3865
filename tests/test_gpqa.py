"""Tests for the GPQA loader, on made-up rows written in the official CSV schema, in both prompt layouts."""

import csv

import pytest

from demopsd.data.gpqa import HUB_DATASET, load_gpqa
from demopsd.data.rewards import score_mcq
from demopsd.data.types import SYSTEM_PROMPT, option_letters, student_conversation

# The official header: the loader must pick its columns out of the others.
HEADER = [
    "Pre-Revision Question",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Explanation",
    "Record ID",
    "High-level domain",
    "Subdomain",
]
DOMAINS = ("Physics", "Chemistry", "Biology")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_rows(count: int = 20) -> list[dict]:
    """``count`` rows; row ``i`` has domain ``DOMAINS[i % 3]`` and distinct texts that name ``i``."""
    return [
        {
            "Pre-Revision Question": f"old {i}",
            "Question": f"What is quantity {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong {i}.1",
            "Incorrect Answer 2": f"wrong {i}.2",
            "Incorrect Answer 3": f"wrong {i}.3",
            "Explanation": "because",
            "Record ID": f"rec{i}",
            "High-level domain": DOMAINS[i % 3],
            "Subdomain": "sub",
        }
        for i in range(count)
    ]


def write_csv(root, rows, subset="diamond", header=HEADER):
    """``rows`` as ``<root>/gpqa/gpqa_<subset>.csv`` with ``header`` (the official columns by default)."""
    path = root / "gpqa" / f"gpqa_{subset}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def options(prompt: str) -> dict[str, str]:
    """Letter -> text of the prompt's option lines, parsed independently of the loader."""
    body = prompt.split("\n\n", 1)[1].removesuffix("\nPlease reason step by step.")
    lines = body.split("\n")
    assert [line[:3] for line in lines] == ["A: ", "B: ", "C: ", "D: "]
    return {line[0]: line[3:] for line in lines}


def test_correct_letter_points_at_the_correct_text(tmp_path):
    rows = make_rows()
    write_csv(tmp_path, rows)
    for seed in (0, 1, 7):
        examples = load_gpqa(tmp_path, seed=seed, prompt_style="sciknoweval")
        assert [e.idx for e in examples] == list(range(len(rows)))
        for e, row in zip(examples, rows):
            texts = options(e.prompt)
            assert texts[e.answer] == row["Correct Answer"]
            expected = {row["Correct Answer"], *(row[f"Incorrect Answer {j}"] for j in (1, 2, 3))}
            assert set(texts.values()) == expected
            assert e.prompt.startswith(f"{row['Question']}\n\nA: ")
            assert e.prompt.endswith("\nPlease reason step by step.")
            assert (e.system, e.letters) == (SYSTEM_PROMPT, "ABCD")


def test_seed_fixes_the_letters(tmp_path):
    write_csv(tmp_path, make_rows())
    first, again, other = (load_gpqa(tmp_path, seed=s) for s in (0, 0, 1))
    assert first == again
    assert [e.answer for e in first] != [e.answer for e in other]
    assert [e.prompt for e in first] != [e.prompt for e in other]


# Correct letters of make_rows() at seed 0, computed outside the loader: the correct text (index 0) sits
# where permutations(range(4))[int(sha256(b"0\x00" + question)[:8]) % 24] puts it.
PINNED_SEED0 = "BCABBBBBDABCABBCBDBB"


def test_letters_are_pinned_and_spread(tmp_path):
    """SHA-256 fixes the order on every machine and Python version; a change to the shuffle shows here."""
    write_csv(tmp_path, make_rows())
    answers = "".join(e.answer for e in load_gpqa(tmp_path, seed=0))
    assert answers == PINNED_SEED0
    assert set(answers) == set("ABCD")  # not stuck on one position


def test_order_follows_the_question_not_its_row(tmp_path):
    """The same question gets the same letters in another subset file and at another row."""
    rows = make_rows()
    write_csv(tmp_path, rows, "diamond")
    write_csv(tmp_path, rows[::-1], "main")
    diamond, main = load_gpqa(tmp_path, "diamond", seed=3), load_gpqa(tmp_path, "main", seed=3)
    assert [e.prompt for e in diamond] == [e.prompt for e in main[::-1]]
    assert [e.idx for e in main] == list(range(len(rows)))


def test_texts_are_stripped_and_multiline_questions_kept_in_the_sciknoweval_layout(tmp_path):
    row = make_rows(1)[0] | {
        "Question": "  Line one,\nline two?\n",
        "Correct Answer": " yes ",
        "Incorrect Answer 1": "no\n",
    }
    write_csv(tmp_path, [row])
    (e,) = load_gpqa(tmp_path, prompt_style="sciknoweval")
    assert e.prompt.startswith("Line one,\nline two?\n\nA: ")
    texts = options(e.prompt.replace("Line one,\nline two?", "Q", 1))
    assert texts[e.answer] == "yes"
    assert sorted(texts.values()) == ["no", "wrong 0.2", "wrong 0.3", "yes"]


def test_prompt_parses_and_scores(tmp_path):
    write_csv(tmp_path, make_rows())
    for e in load_gpqa(tmp_path, seed=5, prompt_style="sciknoweval"):
        assert option_letters(e.prompt) == e.letters == "ABCD"
        assert score_mcq(f"<answer>\n{e.answer}\n</answer>", e.answer, e.letters).reward == 1.0
        wrong = "ABCD"[("ABCD".index(e.answer) + 1) % 4]
        assert score_mcq(f"<answer>\n{wrong}\n</answer>", e.answer, e.letters).reward == 0.0


# The reference's data/format/gpqa.py, written out by hand for one row whose options land (seed 0) in the order
# Incorrect Answer 3, Correct Answer, Incorrect Answer 2, Incorrect Answer 1.
WEAK_FORCE = {
    "Question": "Which particle carries the weak force?", "Correct Answer": "The W and Z bosons",
    "Incorrect Answer 1": "The photon", "Incorrect Answer 2": "The gluon", "Incorrect Answer 3": "The graviton",
}
WEAK_FORCE_PROMPT = (
    "Return your final response within \\boxed{} and only include the letter choice (A, B, C, or D) as your final "
    "response.\n"
    "Problem: Which particle carries the weak force?\n"
    "Options: A) The graviton, B) The W and Z bosons, C) The gluon, D) The photon\n"
    "Answer:"
)


def test_reference_layout_is_the_references_prompt_to_the_character(tmp_path):
    """The default layout: the reference's instruction, problem, one-line options and "Answer:", as the only
    message (no system prompt), the correct letter where the correct text is."""
    write_csv(tmp_path, [make_rows(1)[0] | WEAK_FORCE])
    (e,) = load_gpqa(tmp_path, seed=0)
    assert e.prompt == WEAK_FORCE_PROMPT
    assert (e.answer, e.system, e.letters) == ("B", None, "ABCD")
    assert student_conversation(e) == [{"role": "user", "content": WEAK_FORCE_PROMPT}]


def test_reference_layout_keeps_the_texts_as_the_file_has_them(tmp_path):
    """The reference formats the raw question and answers (no strip); the letters do not move with whitespace."""
    row = make_rows(1)[0] | WEAK_FORCE | {"Question": "Which particle carries the weak force?\n",
                                          "Correct Answer": " The W and Z bosons"}
    write_csv(tmp_path, [row])
    (e,) = load_gpqa(tmp_path, seed=0)
    assert "Problem: Which particle carries the weak force?\n\nOptions: A) The graviton, B)  The W and Z" in e.prompt
    assert e.answer == "B"


def test_both_layouts_give_each_question_the_same_letters(tmp_path):
    rows = make_rows()
    write_csv(tmp_path, rows)
    reference, sciknoweval = load_gpqa(tmp_path, seed=4), load_gpqa(tmp_path, seed=4, prompt_style="sciknoweval")
    assert [e.answer for e in reference] == [e.answer for e in sciknoweval]
    for e, row in zip(reference, rows):
        assert f"{e.answer}) {row['Correct Answer']}" in e.prompt


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("The weak force is carried by massive bosons.\n\\boxed{B}", 1.0),
        ("A) is a graviton, not a carrier. So the answer is \\boxed{B}.", 1.0),  # the last letter counts
        ("\\boxed{C}", 0.0),
        ("<answer>\nB\n</answer>", 1.0),
    ],
)
def test_reference_layout_is_scored_by_the_references_gpqa_rule(tmp_path, completion, reward):
    """The \\boxed{} answer the reference's prompt asks for earns the reward under ``last_letter`` (the reference's
    ``feedback/gpqa.py``), the rule data=gpqa/* sets; the answer-tag rule would score it 0."""
    from hydra import compose, initialize_config_dir

    from demopsd.config.check import validate_config
    from demopsd.data.loading import load_split
    from tests.helpers import CONFIG_DIR

    write_csv(tmp_path, [make_rows(1)[0] | WEAK_FORCE])
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        data = validate_config(compose("train", overrides=["data=gpqa/diamond"])).data
    assert (data.prompt_style, data.reward) == ("reference", "last_letter")
    (e,) = load_split(data, "test", tmp_path)
    assert (e.prompt, e.reward_rule) == (WEAK_FORCE_PROMPT, "last_letter")
    assert score_mcq(completion, e.answer, e.letters, e.reward_rule).reward == reward
    if "boxed" in completion:
        assert score_mcq(completion, e.answer, e.letters, "answer_tag").reward == 0.0


def test_unknown_prompt_style_names_the_value(tmp_path):
    write_csv(tmp_path, make_rows(2))
    accepted = r"data.prompt_style='paper' is invalid: one of \('reference', 'sciknoweval'\) is accepted"
    with pytest.raises(ValueError, match=accepted):
        load_gpqa(tmp_path, prompt_style="paper")


@pytest.mark.parametrize(
    ("domains", "kept"), [("Chemistry", {"Chemistry"}), (["Physics", "Biology"], {"Physics", "Biology"})]
)
def test_domain_filter_keeps_csv_row_indices(tmp_path, domains, kept):
    rows = make_rows()
    write_csv(tmp_path, rows)
    examples = load_gpqa(tmp_path, domains=domains)
    assert [e.idx for e in examples] == [i for i, row in enumerate(rows) if row["High-level domain"] in kept]
    everything = load_gpqa(tmp_path)
    assert examples == [everything[e.idx] for e in examples]  # filtering does not move the letters


def test_unknown_domain_lists_those_present(tmp_path):
    write_csv(tmp_path, make_rows())
    present = r"unknown GPQA domain\(s\) \['physics'\].*present: Biology, Chemistry, Physics"
    with pytest.raises(ValueError, match=present):
        load_gpqa(tmp_path, domains=["Biology", "physics"])
    with pytest.raises(ValueError, match="domains is empty"):
        load_gpqa(tmp_path, domains=[])


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("Question", "   ", "empty or missing Question"),
        ("Correct Answer", "", "empty or missing Correct Answer"),
        ("Incorrect Answer 3", "\n", "empty or missing Incorrect Answer 3"),
    ],
)
def test_empty_text_names_file_and_row(tmp_path, column, value, problem):
    rows = make_rows(5)
    rows[3][column] = value
    path = write_csv(tmp_path, rows)
    with pytest.raises(ValueError, match=f"^{path}:5: {problem} "):  # row 3 is on line 5 (the header is line 1)
        load_gpqa(tmp_path)


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "gpqa" / "gpqa_diamond.csv"
    path.parent.mkdir()
    header = "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,High-level domain"
    path.write_text(f"{header}\nq,a,b,c,Physics\n")
    with pytest.raises(ValueError, match=r"missing GPQA columns \['Incorrect Answer 3'\]"):
        load_gpqa(tmp_path)


def test_missing_file_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_gpqa(tmp_path, "extended")
    message = str(err.value)
    assert f"put the official gpqa_extended.csv at {tmp_path / 'gpqa' / 'gpqa_extended.csv'}" in message
    assert HUB_DATASET in message and "gated" in message and "HF_HUB_OFFLINE" in message
    assert not (tmp_path / "gpqa").exists()


def test_hub_fallback_reads_the_gated_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return make_rows(4)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    write_csv(tmp_path / "csv", make_rows(4), "main")
    assert load_gpqa(tmp_path, "main", seed=2) == load_gpqa(tmp_path / "csv", "main", seed=2)
    assert calls == [("Idavidrein/gpqa", "gpqa_main", "train")]


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_csv(tmp_path, make_rows(3))
    monkeypatch.setenv("DEMOPSD_DATA_DIR", str(tmp_path))
    assert load_gpqa(None) == load_gpqa(tmp_path)


@pytest.mark.parametrize("subset", ["Diamond", "test", ""])
def test_unknown_subset(tmp_path, subset):
    with pytest.raises(ValueError, match=f"unknown GPQA subset '{subset}'; accepted: diamond, main, extended"):
        load_gpqa(tmp_path, subset)
