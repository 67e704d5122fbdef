"""Search-test fixtures: the repo-wide ``tiny_llama``'s profile on fixed random tokens."""

import pytest
import torch

from kvtuner.profile import ProfileSettings, profile_layers

G = 16  # tiny_llama has head_dim 16, so groups of 16
PAIRS = ("KV8", "K8V4", "K4V8", "K4V4", "K4V2", "K2V4", "K2V2")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tiny_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (1, 96), generator=g), torch.randint(0, 128, (1, 96), generator=g)


@pytest.fixture(scope="session")
def tiny_profile(tiny_llama, tiny_ids):
    torch.set_num_threads(1)
    return profile_layers(tiny_llama, tiny_ids[0], ProfileSettings(pairs=PAIRS, group_size=G, split_bits=None))
