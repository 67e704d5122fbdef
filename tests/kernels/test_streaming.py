"""Streaming torch decode attention against the float64 reference over the whole dequantized cache."""

import pytest
import torch

from kvtuner.kernels.reference import decode_attention_reference
from kvtuner.kernels.streaming import decode_attention_streaming
from kvtuner.quant import QuantSpec, quantize, slice_tokens
from kvtuner.quant.codebook import snap_levels

SPECS = {
    "kivi": (QuantSpec(4, 32, "channel"), QuantSpec(2, 32, "token")),
    "kivi-3bit-g16": (QuantSpec(3, 16, "channel"), QuantSpec(3, 16, "token")),
    "per_token": (QuantSpec(8, 64, "token"), QuantSpec(4, 32, "token")),
    "fp8": (QuantSpec(8, 64, "token", fp8="e4m3"), QuantSpec(8, 64, "token", fp8="e4m3")),
}


def case(specs, n_hist, n_res, ratio=3, levels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 64
    hist_k = torch.randn(b, h, n_hist, d, generator=g) * 2
    hist_k[..., 5] += 6  # an outlier channel
    k_levels, v_levels = levels or (None, None)
    qkeys = quantize(hist_k, specs[0], levels=k_levels) if n_hist else None
    qvalues = quantize(torch.randn(b, h, n_hist, d, generator=g), specs[1], levels=v_levels) if n_hist else None
    return dict(query=torch.randn(b, h * ratio, d, generator=g), qkeys=qkeys, qvalues=qvalues,
                keys=torch.randn(b, h, n_res, d, generator=g), values=torch.randn(b, h, n_res, d, generator=g),
                scale=d**-0.5)


def check(args, history_start=0, **tiles):
    got = decode_attention_streaming(**args, history_start=history_start, **tiles)
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, history_start=history_start,
                                     compute_dtype=torch.float64)
    assert got.dtype == args["query"].dtype
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", SPECS)
@pytest.mark.parametrize("tile", [32, 96, 1024])
def test_every_layout_and_tile(layout, tile):
    check(case(SPECS[layout], 320, 17), tile_tokens=tile)


def test_gqa_ratios_codebooks_and_no_history():
    levels = (snap_levels(15 * torch.linspace(0, 1, 16) ** 1.7, 4), snap_levels(3 * torch.linspace(0, 1, 4) ** 0.6, 2))
    check(case(SPECS["kivi"], 256, 5, ratio=1, levels=levels), tile_tokens=64)
    check(case(SPECS["kivi"], 256, 5, ratio=7), tile_tokens=64)
    check(case(SPECS["kivi"], 0, 9))


@pytest.mark.parametrize("start", [1, 33, 100, 320])
def test_history_start_in_and_across_tiles(start):
    """Skipped slots inside the first tile, a whole tile of them, or the whole history."""
    check(case(SPECS["kivi"], 320, 4, seed=start), history_start=start, tile_tokens=64)


def test_huge_scores_do_not_overflow_the_running_softmax():
    args = case(SPECS["kivi"], 256, 3)
    args["query"] = args["query"] * 300  # scores in the thousands: exp would overflow without the running max
    got = decode_attention_streaming(**args, tile_tokens=32)
    ref = decode_attention_reference(**args)  # float32: at such scores float64 moves the argmax weights
    assert torch.isfinite(got).all() and torch.allclose(got, ref, atol=1e-3)


def test_nothing_to_attend_to_is_an_error():
    args = case(SPECS["kivi"], 64, 0)
    with pytest.raises(ValueError, match="nothing to attend"):
        decode_attention_streaming(**args, history_start=64)


def test_slices_that_cut_a_key_group_are_refused():
    q = quantize(torch.randn(1, 1, 64, 32), QuantSpec(4, 32, "channel"))
    assert slice_tokens(q, 32, 64).dequantize().equal(q.dequantize()[..., 32:, :])
    with pytest.raises(ValueError, match="cuts a key group"):
        slice_tokens(q, 16, 64)


@pytest.mark.parametrize("chunk,n_res,tile", [(2, 2, 64), (7, 19, 96), (32, 32, 1024)])
def test_a_chunk_of_queries_attends_causally_to_its_own_tokens(chunk, n_res, tile):
    """Query c of the chunk sees the whole history and the full-precision tokens up to its own (the last ``chunk``
    of them): the float64 softmax over the dequantized history and those tokens, computed query by query."""
    from kvtuner.kernels.streaming import chunk_attention_streaming
    from kvtuner.quant import dequantize

    args = case(SPECS["kivi"], 320, n_res, seed=chunk)
    g = torch.Generator().manual_seed(9)
    query = torch.randn(2, 9, chunk, 64, generator=g)
    got = chunk_attention_streaming(query, args["qkeys"], args["qvalues"], args["keys"], args["values"],
                                    args["scale"], history_start=3, tile_tokens=tile)
    keys = torch.cat([dequantize(args["qkeys"], torch.float64)[..., 3:, :], args["keys"].double()], dim=-2)
    values = torch.cat([dequantize(args["qvalues"], torch.float64)[..., 3:, :], args["values"].double()], dim=-2)
    keys, values = keys.repeat_interleave(3, dim=1), values.repeat_interleave(3, dim=1)
    for c in range(chunk):
        visible = keys.shape[-2] - chunk + c + 1
        s = query[:, :, c].double()[:, :, None] @ keys[..., :visible, :].transpose(-1, -2) * args["scale"]
        ref = (torch.softmax(s, -1) @ values[..., :visible, :])[:, :, 0]
        err = (got[:, :, c].double() - ref).abs().max().item()
        assert err < 1e-5, (c, err)
