import json
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from demopsd.config.sections import SciKnowEvalData
from demopsd.data.datamodule import PromptDataModule, StepIndexedBatches
from demopsd.data.sciknoweval import load_sciknoweval
from demopsd.data.types import SYSTEM_PROMPT
from tests.helpers import data_dir

DATA_DIR = data_dir()

def biology(**changes) -> SciKnowEvalData:
    return SciKnowEvalData(name="sciknoweval-biology", **changes)


def batches(seed: int, n: int = 1) -> list[list[int]]:
    dm = PromptDataModule(biology(), data_dir=DATA_DIR, seed=seed)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return [[example.idx for example in next(loader)] for _ in range(n)]


def test_batches_are_lists_of_examples_in_a_seeded_order():
    first = batches(seed=0)
    assert all(len(b) == 4 for b in first)
    assert first == batches(seed=0)
    assert first != batches(seed=1)


def test_batch_larger_than_the_split_is_refused():
    size = len(load_sciknoweval(DATA_DIR, "biology", "train"))
    dm = PromptDataModule(biology(batch_size=size + 1), data_dir=DATA_DIR)
    with pytest.raises(ValueError, match=f"data.batch_size={size + 1} exceeds the {size} examples of sciknoweval-biology/train"):
        dm.setup("fit")


def stream(batches: StepIndexedBatches, steps: int) -> list[list[int]]:
    """The batches of steps 0 .. steps-1, read the way Lightning does: one iteration per epoch."""
    out: list[list[int]] = []
    while len(out) < steps:
        batches.start = lambda: len(out)
        out.extend(list(batches))
    return out[:steps]


def test_each_epoch_is_a_permutation_cut_into_batches():
    batches = StepIndexedBatches(num_examples=10, batch_size=3, seed=0)
    epochs = stream(batches, 9)
    assert len(batches) == 3  # the 10th example is dropped each epoch
    for e in range(3):
        indices = [i for b in epochs[3 * e : 3 * e + 3] for i in b]
        assert len(set(indices)) == 9 and set(indices) <= set(range(10))
    assert epochs[:3] != epochs[3:6]  # a new order every epoch


@pytest.mark.parametrize("resume_at", [0, 1, 2, 3, 4, 7])
def test_a_resumed_stream_continues_without_repeating_or_skipping(resume_at):
    uninterrupted = stream(StepIndexedBatches(10, 3, seed=5), 9)
    resumed = StepIndexedBatches(10, 3, seed=5, start=lambda: resume_at)
    first_epoch_rest = list(resumed)
    assert first_epoch_rest == uninterrupted[resume_at : (resume_at // 3 + 1) * 3]


def test_the_order_depends_on_the_seed():
    assert stream(StepIndexedBatches(10, 3, seed=0), 6) != stream(StepIndexedBatches(10, 3, seed=1), 6)
    assert stream(StepIndexedBatches(10, 3, seed=0), 6) == stream(StepIndexedBatches(10, 3, seed=0), 6)


def test_batch_size_larger_than_the_data_is_an_error():
    with pytest.raises(ValueError, match="batch_size=4 needs"):
        StepIndexedBatches(3, 4, seed=0)


def test_processes_share_each_step_batch_without_overlap():
    single = stream(StepIndexedBatches(12, 4, seed=3), 6)
    ranks = [stream(StepIndexedBatches(12, 4, seed=3, rank=r, world_size=2), 6) for r in (0, 1)]
    for step, batch in enumerate(single):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
        assert not set(ranks[0][step]) & set(ranks[1][step]) and len(ranks[0][step]) == 2


def test_a_batch_that_does_not_split_over_the_processes_is_an_error():
    with pytest.raises(ValueError, match="data.batch_size=3 does not split over 2 processes"):
        StepIndexedBatches(12, 3, seed=0, world_size=2)


# ------------------------------------------------------------------------------- epochs of whole batches
def write_questions(root, words_per_question: list[int]) -> None:
    """A biology train split under ``root``: question ``i`` is ``words_per_question[i]`` words long."""
    path = root / "sciknoweval" / "biology" / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"idx": i, "answer": "A", "system": SYSTEM_PROMPT,
             "prompt": " ".join(["word"] * words) + "?\n\nA: yes\nB: no\nPlease reason step by step."}
            for i, words in enumerate(words_per_question)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


class BatchRecorder(L.LightningModule):
    """Records the idx of every batch it is given; one trivial optimizer step per batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([e.idx for e in batch])
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # examples (frozen dataclasses) stay on the host, as in SelfDistillationModule


def test_training_by_epochs_drops_the_last_incomplete_batch_of_each(tmp_path):
    """10 questions in batches of 4: each epoch is 2 full batches of 8 different questions (the reference's
    drop_last), so trainer.max_epochs=3 with max_steps=-1 makes 6 steps."""
    write_questions(tmp_path, [3] * 10)
    dm = PromptDataModule(biology(), data_dir=tmp_path, seed=0)
    module = BatchRecorder()
    trainer = L.Trainer(max_epochs=3, max_steps=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert len(dm.train_dataloader()) == 2
    assert trainer.global_step == 6 and [len(b) for b in module.seen] == [4] * 6
    for epoch in range(3):
        indices = [i for b in module.seen[2 * epoch : 2 * epoch + 2] for i in b]
        assert len(set(indices)) == 8
    assert module.seen[:2] != module.seen[2:4]


# ------------------------------------------------------------------------------------- over-long prompts
class WordTokenizer:
    """A stand-in tokenizer whose tokens are the words of the rendered chat; ``enable_thinking=False`` adds one."""

    def apply_chat_template(self, conversation, tokenize, add_generation_prompt, **kwargs):
        assert not tokenize and add_generation_prompt
        text = " ".join(message["content"] for message in conversation[1:])  # the system prompt is left out
        return text + (" /no_think" if kwargs.get("enable_thinking") is False else "")

    def __call__(self, texts, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [text.split() for text in texts]}


WORDS = [3, 9, 4, 12, 5, 6]  # question words; each prompt has 9 more (the option lines and the last sentence)


def test_long_prompts_are_left_out_with_a_warning_giving_their_number(tmp_path, caplog):
    write_questions(tmp_path, WORDS)
    dm = PromptDataModule(biology(batch_size=2, max_prompt_tokens=15), data_dir=tmp_path, tokenizer=WordTokenizer())
    with caplog.at_level(logging.WARNING, logger="demopsd.data.datamodule"):
        dm.setup("fit")
    assert [e.idx for e in dm.train_examples] == [0, 2, 4, 5]  # 12, 13, 14, 15 tokens; 18 and 21 are too long
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("left out 2 of the 6 prompts of sciknoweval-biology/train: longer than "
                              "data.max_prompt_tokens=15 tokens")
    assert "the longest has 21" in message


def test_long_prompts_stop_the_run_under_error(tmp_path):
    write_questions(tmp_path, WORDS)
    data = biology(batch_size=2, max_prompt_tokens=15, on_long_prompt="error")
    dm = PromptDataModule(data, data_dir=tmp_path, tokenizer=WordTokenizer())
    expected = (r"2 of the 6 prompts of sciknoweval-biology/train have more than data.max_prompt_tokens=15 tokens, "
                r"the first idx 1 with 18; raise data.max_prompt_tokens, or set data.on_long_prompt=filter")
    with pytest.raises(ValueError, match=expected):
        dm.setup("fit")


def test_prompts_within_the_limit_load_unchanged_in_both_modes(tmp_path, caplog):
    write_questions(tmp_path, WORDS)
    for mode in ("filter", "error"):
        data = biology(batch_size=2, max_prompt_tokens=21, on_long_prompt=mode)
        dm = PromptDataModule(data, data_dir=tmp_path, tokenizer=WordTokenizer())
        with caplog.at_level(logging.WARNING, logger="demopsd.data.datamodule"):
            dm.setup("fit")
        assert [e.idx for e in dm.train_examples] == list(range(6))
    assert caplog.records == []


def test_the_attached_module_lends_its_tokenizer_and_chat_template_arguments(tmp_path):
    """Without a tokenizer of its own, the datamodule counts with the LightningModule's tokenizer and chat template
    arguments (here ``enable_thinking=False`` adds a token: 15 tokens become 16)."""
    write_questions(tmp_path, WORDS)
    dm = PromptDataModule(biology(batch_size=2, max_prompt_tokens=15), data_dir=tmp_path)
    module = SimpleNamespace(tokenizer=WordTokenizer(),
                             prompts=SimpleNamespace(chat_template_kwargs={"enable_thinking": False}))
    dm.trainer = SimpleNamespace(lightning_module=module, loggers=[], global_step=0, global_rank=0, world_size=1)
    dm.setup("fit")
    assert [e.idx for e in dm.train_examples] == [0, 2, 4]


def test_without_a_tokenizer_lengths_are_not_checked_at_load(tmp_path):
    write_questions(tmp_path, WORDS)
    dm = PromptDataModule(biology(batch_size=2, max_prompt_tokens=1), data_dir=tmp_path)
    dm.setup("fit")
    assert len(dm.train_examples) == 6


def test_the_length_checked_is_the_length_the_model_is_given():
    """With the default model's tokenizer, a prompt of exactly the limit (as ``encode_prompts`` counts it) is kept
    and one token less leaves it out: the datamodule and the rollout's encoding render the chat alike."""
    from transformers import AutoTokenizer

    from demopsd.data.types import student_conversation
    from demopsd.rollout.batch import encode_prompts
    from demopsd.runtime.models import GGUF_FILE, default_gguf_dir, prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(default_gguf_dir(), gguf_file=GGUF_FILE))
    examples = load_sciknoweval(DATA_DIR, "biology", "train")
    lengths = encode_prompts(tokenizer, [student_conversation(e) for e in examples]).mask.sum(-1).tolist()
    longest = max(lengths)
    kept = []
    for limit in (longest, longest - 1):
        dm = PromptDataModule(biology(batch_size=1, max_prompt_tokens=limit), data_dir=DATA_DIR, tokenizer=tokenizer)
        dm.setup("fit")
        kept.append([e.idx for e in dm.train_examples])
    assert kept[0] == [e.idx for e in examples]
    assert kept[1] == [e.idx for e, n in zip(examples, lengths) if n < longest]


def test_on_long_prompt_is_a_key_of_every_training_dataset_and_filters_by_default():
    """The config check accepts ``data.on_long_prompt`` because conf/data defines it; a misspelling is refused."""
    from demopsd.config.check import ConfigError, validate_config
    from tests.test_config import DATASETS, compose_train

    for dataset in DATASETS:
        assert compose_train([f"data={dataset}"]).data.on_long_prompt == "filter"
    validate_config(compose_train(["data=sciknoweval/chemistry", "data.on_long_prompt=error"]))
    with pytest.raises(ConfigError, match="data.on_long_promt='error'.*did you mean data.on_long_prompt"):
        validate_config(compose_train(["+data.on_long_promt=error"]))
