import os

import pytest

from demopsd.datamodule import PromptDataModule

DATA_DIR = os.environ.get("DEMOPSD_DATA_DIR", "../shared/data")


def batches(seed: int, n: int = 3) -> list[list[int]]:
    dm = PromptDataModule(source="sciknoweval", domain="biology", data_dir=DATA_DIR, batch_size=4, seed=seed)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return [[example.idx for example in next(loader)] for _ in range(n)]


def test_batches_are_lists_of_examples_in_a_seeded_order():
    first = batches(seed=0)
    assert all(len(b) == 4 for b in first)
    assert first == batches(seed=0)
    assert first != batches(seed=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"source": "mmlu"}, "data.source='mmlu'.*sciknoweval"), ({"batch_size": 0}, "data.batch_size=0")],
)
def test_bad_settings_name_the_value(kwargs, message):
    args = dict(source="sciknoweval", domain="biology", data_dir=DATA_DIR, batch_size=4) | kwargs
    with pytest.raises(ValueError, match=message):
        PromptDataModule(**args)


def test_batch_larger_than_the_split_is_refused():
    dm = PromptDataModule(source="sciknoweval", domain="biology", data_dir=DATA_DIR, batch_size=451)
    with pytest.raises(ValueError, match="data.batch_size=451 exceeds the 450 examples"):
        dm.setup("fit")
