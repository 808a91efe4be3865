import pytest
import torch


@pytest.fixture(autouse=True)
def float64_by_default():
    """The objective tests compare against closed forms: compute in float64 unless a test says otherwise."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
