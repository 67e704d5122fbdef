import pytest
import torch

from kvtuner.quant.outliers import cat_blocks, extract, split


def heavy_tailed(*shape, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    x[torch.rand(*shape) < 0.02] *= 30
    return x


def test_split_clamps_and_keeps_the_rest_exactly():
    x = heavy_tailed(2, 3, 16, 8)
    lo, hi = torch.tensor(-2.0), torch.tensor(2.5)
    clamped, out = split(x, lo, hi, block=8)
    assert clamped.min() >= -2 and clamped.max() <= 2.5
    mask = (x < -2) | (x > 2.5)
    assert out.count == int(mask.sum())
    restored = out.scatter_into(clamped)
    torch.testing.assert_close(restored[mask], x[mask].half().float())  # outliers come back as fp16
    assert torch.equal(restored[~mask], x[~mask])
    assert out.nbytes() == 4 * out.count + 4 * (16 // 8) * 2 * 3


def test_per_channel_thresholds_broadcast():
    x = heavy_tailed(1, 2, 8, 4)
    lo = torch.full((1, 2, 1, 4), -1.0)
    hi = torch.tensor([[[[1.0, 100.0, 1.0, 100.0]]]]).expand(1, 2, 1, 4)
    _, out = split(x, lo, hi, block=8)
    mask, _ = out.mask_and_values()
    assert not mask[..., 1].logical_and(x[..., 1] > -1).any()  # channel 1 clips only below


def test_appended_blocks_equal_one_extraction():
    x = heavy_tailed(2, 2, 24, 8, seed=1)
    mask = x.abs() > 2
    whole = extract(x, mask, block=8)
    parts = cat_blocks([extract(x[..., :8, :], mask[..., :8, :], 8), extract(x[..., 8:, :], mask[..., 8:, :], 8)])
    for a, b in zip(whole.stored_tensors(), parts.stored_tensors()):
        assert torch.equal(a, b)


def test_batch_operations_follow_the_rows():
    x = heavy_tailed(3, 2, 16, 8, seed=2)
    mask = x.abs() > 2
    out = extract(x, mask, block=16)
    picked = out.map(lambda t: t.index_select(0, torch.tensor([2, 0])))
    expected = extract(x[[2, 0]], mask[[2, 0]], block=16)
    for a, b in zip(picked.stored_tensors(), expected.stored_tensors()):
        assert torch.equal(a, b)


def test_refuses_blocks_too_large_for_int16_indices():
    with pytest.raises(ValueError, match="int16"):
        extract(torch.zeros(1, 1, 256, 128), torch.zeros(1, 1, 256, 128, dtype=torch.bool), block=256)
