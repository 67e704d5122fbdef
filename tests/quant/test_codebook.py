import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtuner.quant.codebook import fit_levels, nearest_level, uniform_levels, weighted_error


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 7, allow_nan=False), min_size=1, max_size=50), st.integers(1, 4))
def test_nearest_level_is_the_brute_force_nearest(values, bits):
    levels = torch.sort(torch.rand(2**bits) * (2**bits - 1)).values
    y = torch.tensor(values).clamp(0, 2**bits - 1)
    idx = nearest_level(y, levels)
    dist = (y[:, None] - levels[None]).abs()
    assert torch.allclose(dist.gather(1, idx[:, None]).squeeze(1), dist.min(1).values)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fit_pins_the_ends_and_never_loses_to_the_uniform_grid(bits):
    torch.manual_seed(bits)
    qmax = 2**bits - 1
    y = (torch.randn(5000) * qmax / 6 + qmax / 2).clamp(0, qmax)  # crowded in the middle
    w = torch.rand(5000)
    levels = fit_levels(y, w, bits)
    assert levels[0] == 0 and levels[-1] == qmax and torch.all(levels[1:] >= levels[:-1])
    assert weighted_error(y, w, levels) < weighted_error(y, w, uniform_levels(bits))


def test_weights_pull_levels_toward_what_matters():
    y = torch.cat([torch.full((1000,), 1.2), torch.full((1000,), 5.6)])
    heavy_right = torch.cat([torch.full((1000,), 1e-3), torch.ones(1000)])
    levels = fit_levels(y, heavy_right, 3)
    assert (levels - 5.6).abs().min() < 1e-6  # the heavily weighted mode gets an exact level


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="finite"):
        fit_levels(torch.tensor([float("nan")]), torch.ones(1), 2)
    with pytest.raises(ValueError, match="1-D"):
        fit_levels(torch.zeros(2, 2), torch.ones(2, 2), 2)
