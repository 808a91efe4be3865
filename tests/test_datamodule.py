import pytest

from demopsd.data.datamodule import PromptDataModule, StepIndexedBatches
from demopsd.data.sciknoweval import load_sciknoweval
from tests.helpers import data_dir

DATA_DIR = data_dir()



def biology(**changes) -> dict:
    return {"name": "sciknoweval-biology", "source": "sciknoweval", "domain": "biology", "train_split": "train",
            "batch_size": 4, **changes}


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


def test_unknown_source_names_the_value():
    dm = PromptDataModule(biology(source="mmlu"), data_dir=DATA_DIR)
    with pytest.raises(ValueError, match="data.source='mmlu' is invalid.*sciknoweval"):
        dm.setup("fit")


def test_bad_batch_size_names_the_value():
    with pytest.raises(ValueError, match="data.batch_size=0 is invalid"):
        PromptDataModule(biology(batch_size=0), data_dir=DATA_DIR)


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
