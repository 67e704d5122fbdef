import pytest
import torch

from kvtuner.quant.outliers import cat_blocks, extract


def heavy_tailed(*shape, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    x[torch.rand(*shape) < 0.02] *= 30
    return x


def test_outliers_come_back_exactly_and_are_counted():
    x = heavy_tailed(2, 3, 16, 8)
    mask = (x < -2) | (x > 2.5)
    out = extract(x, mask, block=8)
    assert out.count == int(mask.sum())
    restored = out.scatter_into(torch.zeros_like(x))
    torch.testing.assert_close(restored[mask], x[mask].half().float())  # outliers come back as fp16
    assert torch.all(restored[~mask] == 0)
    got_mask, _ = out.mask_and_values()
    assert torch.equal(got_mask, mask)
    assert out.nbytes() == 4 * out.count + 4 * (16 // 8) * 2 * 3


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
