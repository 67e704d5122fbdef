import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtuner.quant import QuantSpec, cat_tokens, packed_width, quantize

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
