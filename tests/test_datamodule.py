import os

import pytest

from demopsd.datamodule import PromptDataModule

DATA_DIR = os.environ.get("DEMOPSD_DATA_DIR", "../shared/data")




def biology(**changes) -> dict:
    return {"name": "sciknoweval-biology", "source": "sciknoweval", "domain": "biology", "train_split": "train",
            "batch_size": 4, **changes}


def batches(seed: int, n: int = 3) -> list[list[int]]:
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
    dm = PromptDataModule(biology(batch_size=451), data_dir=DATA_DIR)
    with pytest.raises(ValueError, match="data.batch_size=451 exceeds the 450 examples of sciknoweval-biology/train"):
        dm.setup("fit")
