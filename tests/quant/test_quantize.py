import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtuner.quant import NonFiniteError, QuantSpec, cat_tokens, packed_width, quantize

shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.sampled_from([32, 64, 96]), st.sampled_from([32, 64]))


def _x(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _expand(t, spec, shape):
    """Broadcast per-group scale to the element shape."""
    g = spec.group_len(torch.Size(shape))
    return t.repeat_interleave(g, dim=-1 if spec.axis == "token" else -2)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from([1, 2, 3, 4, 8]), axis=st.sampled_from(["token", "channel"]),
       group=st.sampled_from([16, 32]), seed=st.integers(0, 2**31), magnitude=st.sampled_from([1e-2, 1.0, 30.0]))
def test_asymmetric_error_within_half_step(shape, bits, axis, group, seed, magnitude):
    x = _x(shape, seed, magnitude)
    spec = QuantSpec(bits, group, axis)
    q = quantize(x, spec)
    err = (q.dequantize() - x).abs()
    step = _expand(q.scale.float(), spec, shape)
    # half a step, plus fp16 rounding of the stored scale/zero (relative 2^-11 of the group's range)
    slack = 1e-3 * (x.abs().max() + step * 2**bits)
    assert torch.all(err <= step / 2 + slack)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 2**31))
def test_symmetric_error_within_half_step(shape, bits, seed):
    x = _x(shape, seed)
    spec = QuantSpec(bits, 32, "token", symmetric=True)
    q = quantize(x, spec)
    assert q.zero is None
    step = _expand(q.scale.float(), spec, shape)
    assert torch.all((q.dequantize() - x).abs() <= step / 2 + 1e-3 * x.abs().max())


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_constant_groups_are_exact_and_finite(bits, axis):
    x = torch.full((1, 2, 64, 32), 0.75)
    out = quantize(x, QuantSpec(bits, 32, axis)).dequantize()
    assert torch.isfinite(out).all()
    assert torch.equal(out, x)


def _offset_narrow(offset, span, tokens=16, d=32):
    """Rows of ``d`` values ``offset + shift + [0, span]``, the shifts stepping the row minimum through
    one fp16 spacing, so rounding it to nearest lands above the minimum for about half the rows."""
    spacing = 2.0 ** (math.floor(math.log2(offset)) - 10)
    shift = torch.arange(tokens).unsqueeze(-1) * spacing / tokens
    return (offset + shift + span * torch.linspace(0, 1, d)).reshape(1, 1, tokens, d)


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("offset,span,bits", [(100.0, 0.01, 8), (1000.0, 0.5, 4)])
def test_offset_narrow_groups_stay_within_half_step(offset, span, bits, axis):
    # rounding the zero to nearest gave negative scales and errors of 1485 steps (100, 0.01, 8 bits)
    # and 11.7 steps, 0.219 against a step of 0.0188 (1000, 0.5, 4 bits)
    x = _offset_narrow(offset, span)
    if axis == "channel":
        x = x.transpose(-1, -2)  # each channel's 32 tokens are one group
    spec = QuantSpec(bits, 32, axis)
    q = quantize(x, spec)
    assert torch.all(q.scale > 0)
    step, zero = _expand(q.scale.double(), spec, x.shape), _expand(q.zero.double(), spec, x.shape)
    assert torch.all((zero <= x) & (x <= zero + (2**bits - 1) * step))  # the grid covers every group
    assert torch.all((q.dequantize() - x).abs() <= step / 2 * (1 + 1e-3) + 2**-22 * x.abs())


def test_symmetric_scale_rounds_up():
    x = torch.linspace(-1, 1, 32).reshape(1, 1, 1, 32)  # 1 / 7 rounds down to nearest in fp16
    q = quantize(x, QuantSpec(4, 32, "token", symmetric=True))
    assert q.scale.float().item() * 7 >= 1
    assert torch.all((q.dequantize() - x).abs() <= q.scale.float() / 2 * (1 + 1e-3))


@pytest.mark.parametrize("absmax", [448 * 8e-8, 448 * 3e-8, 448 * 1.0004])
def test_fp8_scale_rounds_up(absmax):
    # 448 * 8e-8: the fp16 scale rounded to nearest (5.96e-8, subnormal) was 25% small, so
    # x / scale = 601 overflowed e4m3 (NaN on CUDA, saturated to 448 on this CPU)
    x = torch.linspace(-1, 1, 32).reshape(1, 1, 1, 32) * absmax
    q = quantize(x, QuantSpec(8, 32, "token", fp8="e4m3"))
    out = q.dequantize()
    assert not out.isnan().any()
    assert q.scale.float().item() * 448 >= absmax
    assert (out - x).abs().max() <= 2**-4 * absmax


@pytest.mark.parametrize("kwargs", [dict(bits=4), dict(bits=4, symmetric=True), dict(bits=8, fp8="e4m3")])
def test_non_finite_input_raises(kwargs):
    x = torch.randn(1, 2, 8, 32)
    x[0, 0, 1, 3] = float("nan")
    x[0, 1, 2, 5] = float("inf")
    x[0, 1, 7, 0] = float("-inf")
    for axis in ("token", "channel"):
        with pytest.raises(NonFiniteError, match="1 NaN and 2 Inf of 512 elements"):
            quantize(x, QuantSpec(group_size=8, axis=axis, **kwargs))


def test_zero_beyond_fp16_range_raises_and_wider_scales_work():
    x = 1e5 + torch.randn(1, 1, 4, 32)
    message = r"\|x\| = 100\d{3} .*float16 \(65504\).*scale_dtype=torch.bfloat16 or torch.float32"
    with pytest.raises(ValueError, match=message):
        quantize(x, QuantSpec(4, 32, "token"))
    for dtype in (torch.bfloat16, torch.float32):
        q = quantize(x, QuantSpec(4, 32, "token", scale_dtype=dtype))
        assert q.scale.dtype == dtype and torch.all(q.zero.float() <= x.amin(-1, keepdim=True))
        step = q.scale.float().repeat_interleave(32, -1)
        assert torch.all((q.dequantize() - x).abs() <= step / 2 * (1 + 1e-3) + 2**-22 * x.abs())


def test_scale_beyond_fp16_range_raises():
    x = torch.tensor([-6e4, 6e4]).repeat(16).reshape(1, 1, 1, 32)  # in range, but 1 bit needs scale 1.2e5
    with pytest.raises(ValueError, match="beyond the largest torch.float16"):
        quantize(x, QuantSpec(1, 32, "token"))
    assert torch.equal(quantize(x, QuantSpec(2, 32, "token")).dequantize(), x)


def test_error_shrinks_as_bits_grow():
    x = _x((2, 4, 128, 64), 0)
    errs = [(quantize(x, QuantSpec(b, 32, "channel")).dequantize() - x).pow(2).mean().item() for b in (1, 2, 3, 4, 8)]
    assert all(a > 2 * b for a, b in zip(errs, errs[1:]))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.sampled_from([1, 2, 3, 4, 8]), axis=st.sampled_from(["token", "channel"]),
       symmetric=st.booleans())
def test_byte_count_is_exact(shape, bits, axis, symmetric):
    if symmetric and bits < 2:
        return
    b, h, t, d = shape
    spec = QuantSpec(bits, 32, axis, symmetric=symmetric)
    q = quantize(torch.randn(shape), spec)
    groups = b * h * (t * d // 32)
    expected = b * h * t * packed_width(d, bits) * 4 + groups * 2 * (1 if symmetric else 2)
    assert q.nbytes() == expected
    assert q.nbytes() == sum(x.numel() * x.element_size() for x in (q.payload, q.scale, q.zero) if x is not None)


def test_four_bit_group32_is_five_bits_per_element():
    x = torch.randn(1, 3, 2048, 64)
    for axis in ("token", "channel"):
        q = quantize(x, QuantSpec(4, 32, axis))
        assert q.nbytes() * 8 / x.numel() == pytest.approx(5.0)


@pytest.mark.parametrize("fmt,rel", [("e4m3", 0.07), ("e5m2", 0.13)])
def test_fp8_relative_error(fmt, rel):
    x = _x((2, 3, 64, 64), 1, 5.0)
    q = quantize(x, QuantSpec(8, 32, "token", fp8=fmt))
    assert q.payload.dtype == torch.uint8
    assert q.nbytes() == x.numel() + x.numel() // 32 * 2
    err = (q.dequantize() - x).abs()
    assert torch.all(err <= rel * x.abs() + 1e-3)


def test_passthrough_keeps_tensor():
    x = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    q = quantize(x, QuantSpec(16))
    assert torch.equal(q.dequantize(torch.bfloat16), x) and q.nbytes() == x.numel() * 2


def test_cat_tokens_matches_quantizing_parts():
    x = _x((1, 2, 96, 32), 3)
    spec = QuantSpec(4, 32, "channel")
    parts = [quantize(x[..., i : i + 32, :], spec) for i in (0, 32, 64)]
    joined = cat_tokens(parts)
    assert joined.shape == x.shape
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts], dim=-2))


def test_group_must_divide_axis():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize(torch.randn(1, 1, 40, 32), QuantSpec(4, 32, "channel"))


@pytest.mark.parametrize("kwargs", [dict(bits=5), dict(bits=1, symmetric=True), dict(bits=4, fp8="e4m3"),
                                    dict(bits=4, axis="head"), dict(bits=4, group_size=0)])
def test_invalid_specs(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("spec", [QuantSpec(4, 16, "channel"), QuantSpec(2, 32, "token"), QuantSpec(3, 16, "channel"),
                                  QuantSpec(8, 32, "token", fp8="e4m3"), QuantSpec(16, 32, "token")])
def test_a_buffer_written_block_by_block_reads_as_the_concatenation(spec):
    from kvtuner.quant import cat_tokens, reserve_tokens, slice_tokens, write_tokens

    torch.manual_seed(0)
    blocks = [quantize(torch.randn(2, 3, 32, 64), spec) for _ in range(4)]
    buffer = reserve_tokens(blocks[0], 160)
    pointers = [t.data_ptr() for t in buffer.stored_tensors()]
    for i, block in enumerate(blocks[1:], 1):
        write_tokens(buffer, 32 * i, block)
    got, want = slice_tokens(buffer, 0, 128), cat_tokens(blocks)
    assert [t.data_ptr() for t in buffer.stored_tensors()] == pointers  # written in place
    assert got.shape == want.shape and got.nbytes() == want.nbytes()  # the view counts its tokens, not the room
    for a, b in zip(got.stored_tensors(), want.stored_tensors()):
        assert torch.equal(a, b)
    assert torch.equal(got.dequantize(), want.dequantize())
    if spec.axis == "channel":
        with pytest.raises(ValueError, match="cuts a key group"):
            write_tokens(buffer, 120, blocks[0])
    with pytest.raises(ValueError, match="do not fit"):
        write_tokens(buffer, 144, blocks[0])
