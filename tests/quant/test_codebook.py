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
    """One free level (2 bits, ends pinned) over a cluster of values: it lands on the weighted mean."""
    y = torch.linspace(1.0, 1.4, 1000)  # nearest interior level: 1
    w = torch.where(y > 1.3, 1.0, 1e-3)  # the loss cares about the top of the cluster
    levels = fit_levels(y, w, 2)
    weighted_mean = float((w * y).sum() / w.sum())
    assert abs(float(levels[1]) - weighted_mean) < 1e-4 and weighted_mean > 1.3
    assert abs(float(fit_levels(y, torch.ones_like(y), 2)[1]) - 1.2) < 1e-4  # unweighted: the plain mean


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="finite"):
        fit_levels(torch.tensor([float("nan")]), torch.ones(1), 2)
    with pytest.raises(ValueError, match="one shape"):
        fit_levels(torch.zeros(2, 2), torch.ones(2), 2)


def test_rows_fit_independently():
    torch.manual_seed(5)
    y = torch.stack([torch.rand(2000) * 3, (torch.randn(2000) * 0.3 + 1.5).clamp(0, 3)])
    w = torch.ones_like(y)
    rows = fit_levels(y, w, 2)
    assert rows.shape == (2, 4)
    for r in range(2):
        torch.testing.assert_close(rows[r], fit_levels(y[r], w[r], 2))
    assert torch.equal(nearest_level(y, rows)[1], nearest_level(y[1], rows[1]))


def test_free_ends_follow_the_data_when_the_range_is_calibrated():
    """A calibrated range's ends are rare quantiles: free levels move in to where the mass is."""
    torch.manual_seed(8)
    y = (torch.randn(20000) * 0.4 + 1.5).clamp(0, 3)  # 2 bits: qmax 3, mass in the middle
    w = torch.ones_like(y)
    pinned, free = fit_levels(y, w, 2), fit_levels(y, w, 2, pin_ends=False)
    assert pinned[0] == 0 and pinned[-1] == 3
    assert free[0] > 0.5 and free[-1] < 2.5
    assert weighted_error(y, w, free) < 0.5 * weighted_error(y, w, pinned)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=16), st.sampled_from([2, 3, 4]))
@settings(max_examples=60, deadline=None)
def test_snapped_levels_sit_on_the_kernel_grid_near_the_fitted_ones(fractions, bits):
    from kvtuner.quant.codebook import level_grid, snap_levels

    qmax = 2**bits - 1
    fitted = torch.tensor(sorted([0.0, *fractions[: 2**bits - 2], 1.0]) + [1.0] * max(0, 2**bits - 2 - len(fractions)))
    fitted = (fitted * qmax)[: 2**bits]
    snapped = snap_levels(fitted, bits)
    grid = level_grid(bits)
    assert grid * qmax <= 127 and grid & (grid - 1) == 0  # one 7-bit byte a level, exact in fp16
    assert snapped.dtype == torch.float16
    assert torch.equal(snapped.float() * grid, torch.round(snapped.float() * grid))
    assert (snapped.float() - fitted).abs().max() <= 0.5 / grid + 1e-6
    assert snapped[0] == 0 and snapped[-1] == qmax  # pinned ends stay exact
    assert torch.all(snapped.diff() >= 0)


def test_a_method_uses_its_shared_tables_on_the_grid():
    from kvtuner.config import LayerSpec
    from kvtuner.method import KVMethod, SideCalibration

    fitted = torch.tensor([0.0, 0.61, 1.93, 3.0])
    cal = SideCalibration(levels=fitted.half())
    method = KVMethod(LayerSpec("kivi", 2, 2, 32, 32, codebook=True), cal, SideCalibration(levels=fitted.half()))
    assert method.key_calibration.levels.tolist() == [0.0, 0.625, 1.9375, 3.0]  # 20/32, 62/32
    assert cal.levels.tolist() == fitted.half().tolist()  # the caller's calibration is left alone
