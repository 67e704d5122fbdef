"""The profile tests use the repo-wide ``tiny_llama`` (tests/conftest.py) with one torch thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: with two threads on two shared cores, thread hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
