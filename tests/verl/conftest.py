"""One intra-op thread for the RL-core tests: the CI machine has 2 cores shared by parallel jobs."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
