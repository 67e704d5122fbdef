"""Numerical properties of the quantizers over hard inputs, checked against the STORED scales.

Regimes: ordinary values, tiny (1e-5) and huge (1e4) magnitudes, and offset-narrow groups (far
from zero, narrow range: the case where a zero rounded to nearest lands above the group); odd
head_dims (80, 96), token counts that no group divides, constant groups, NaN/Inf.
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvtuner.quant import NonFiniteError, QuantSpec, pack, quantize, unpack
from kvtuner.quant.tensor import round_directed

SCALE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# half an ulp: relative for normal numbers, and absolute (times the scale) for subnormal ones
FP8_PRECISION = {"e4m3": (2**-4, 2**-10), "e5m2": (2**-3, 2**-17)}
TINY = torch.finfo(torch.float32).tiny  # below it float32 is subnormal: (max - zero) / qmax may underflow to 0


def _expand(t, spec, shape):
    """Broadcast a per-group scale or zero to the element shape."""
    return t.repeat_interleave(spec.group_len(torch.Size(shape)), dim=-1 if spec.axis == "token" else -2)


@st.composite
def layouts(draw):
    """(shape, group_size, axis): head_dim 32/64/80/96 and a group that divides it (or -1) on the
    token axis with any token count; on the channel axis a whole number of token groups."""
    d = draw(st.sampled_from([32, 64, 80, 96]))
    axis = draw(st.sampled_from(["token", "channel"]))
    if axis == "token":
        group = draw(st.sampled_from([g for g in (16, 32, 48, 80, -1) if g == -1 or d % g == 0]))
        t = draw(st.integers(1, 40))
    else:
        group = draw(st.sampled_from([8, 16, -1]))
        t = draw(st.integers(1, 3)) * group if group != -1 else draw(st.integers(1, 40))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 2)), t, d), group, axis


@st.composite
def values(draw, shape):
    """A float32 tensor of ``shape`` in one of the regimes, from a seeded generator."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    noise = torch.randn(shape, generator=g).clamp(-3, 3)  # bounded, so huge stays in fp16's range
    regime = draw(st.sampled_from(["normal", "tiny", "huge", "offset-narrow"]))
    if regime == "normal":
        return noise
    if regime == "tiny":
        return noise * 1e-5
    if regime == "huge":
        return noise * 1e4
    offset = draw(st.floats(10, 2e4)) * draw(st.sampled_from([-1, 1]))
    return offset + noise * abs(offset) * 10 ** -draw(st.floats(2, 6))


def assert_within_half_step(x, q):
    """Every element within half a stored step of itself: the (1 + 1e-3), the 2^-22 |x| and TINY
    allow for float32 rounding in (max - zero) / qmax, (x - zero) / scale and zero + code * scale."""
    step = _expand(q.scale.float(), q.spec, x.shape)
    err = (q.dequantize() - x).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-3) + 2**-22 * x.abs() + TINY), (err / step).max()


@settings(max_examples=150, deadline=None)
@given(data=st.data(), bits=st.sampled_from([1, 2, 3, 4, 8]), scale_dtype=st.sampled_from(SCALE_DTYPES))
def test_asymmetric_within_half_stored_step(data, bits, scale_dtype):
    shape, group, axis = data.draw(layouts())
    x = data.draw(values(shape))
    spec = QuantSpec(bits, group, axis, scale_dtype=scale_dtype)
    q = quantize(x, spec)
    assert q.scale.dtype == q.zero.dtype == scale_dtype
    assert torch.all(q.scale >= 0)
    assert_within_half_step(x, q)
    words = pack(unpack(q.payload, bits, shape[-1]), bits)
    assert torch.equal(words, q.payload)  # codes in range: repacking them gives the same words


@settings(max_examples=100, deadline=None)
@given(data=st.data(), bits=st.sampled_from([2, 3, 4, 8]), scale_dtype=st.sampled_from(SCALE_DTYPES))
def test_symmetric_within_half_stored_step(data, bits, scale_dtype):
    shape, group, axis = data.draw(layouts())
    x = data.draw(values(shape))
    q = quantize(x, QuantSpec(bits, group, axis, symmetric=True, scale_dtype=scale_dtype))
    assert q.zero is None
    assert_within_half_step(x, q)
    codes = unpack(q.payload, bits, shape[-1])
    assert codes.min() >= 1  # offset codes of [-qmax, qmax]; 0 would be -qmax - 1
    assert torch.equal(pack(codes, bits), q.payload)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(["e4m3", "e5m2"]), scale_dtype=st.sampled_from(SCALE_DTYPES))
def test_fp8_finite_and_within_format_precision(data, fmt, scale_dtype):
    shape, group, axis = data.draw(layouts())
    x = data.draw(values(shape))
    q = quantize(x, QuantSpec(8, group, axis, fp8=fmt, scale_dtype=scale_dtype))
    out = q.dequantize()
    assert torch.isfinite(out).all()
    rel, subnormal = FP8_PRECISION[fmt]
    step = _expand(q.scale.float(), q.spec, shape)
    assert torch.all((out - x).abs() <= rel * (1 + 1e-3) * x.abs() + subnormal * step + TINY)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), bits=st.sampled_from([1, 2, 3, 4, 8]), symmetric=st.booleans(),
       scale_dtype=st.sampled_from(SCALE_DTYPES), value=st.floats(-3e4, 3e4, width=32))
def test_constant_groups(data, bits, symmetric, scale_dtype, value):
    """Within half a step and finite for any constant; exact when ``scale_dtype`` holds it (asymmetric)."""
    assume(bits >= 2 or not symmetric)
    shape, group, axis = data.draw(layouts())
    spec = QuantSpec(bits, group, axis, symmetric=symmetric, scale_dtype=scale_dtype)
    held = torch.full(shape, torch.tensor(value).to(scale_dtype).item())
    for x in (torch.full(shape, value), held):
        q = quantize(x, spec)
        assert torch.isfinite(q.dequantize()).all()
        assert_within_half_step(x, q)
    if not symmetric:  # zero = the value, scale 0
        assert torch.equal(quantize(held, spec).dequantize(), held)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["int", "symmetric", "e4m3"]), nan=st.integers(0, 3),
       inf=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_non_finite_raises(data, kind, nan, inf, seed):
    assume(nan + inf > 0)
    shape, group, axis = data.draw(layouts())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).flatten()
    where = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))
    x[where[:nan]] = float("nan")
    x[where[nan : nan + inf]] = torch.tensor([float("inf"), -float("inf")]).repeat(2)[:inf]
    kwargs = {"int": dict(bits=4), "symmetric": dict(bits=4, symmetric=True), "e4m3": dict(bits=8, fp8="e4m3")}[kind]
    with pytest.raises(NonFiniteError, match=f"{nan} NaN and {inf} Inf of {x.numel()} elements"):
        quantize(x.reshape(shape), QuantSpec(group_size=group, axis=axis, **kwargs))


@pytest.mark.parametrize("tokens,group", [(40, 32), (7, 16), (33, 32)])
def test_channel_axis_needs_whole_token_groups(tokens, group):
    with pytest.raises(ValueError, match=f"token count {tokens} is not a multiple of group_size {group}"):
        quantize(torch.randn(1, 2, tokens, 80), QuantSpec(4, group, "channel"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_directed_is_the_nearest_value_on_the_right_side(dtype):
    """Against every finite value of ``dtype``, sorted: up is the smallest >= v, down the largest <= v."""
    grid = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted; +0 and -0 merge
    g = torch.Generator().manual_seed(0)
    top = grid[-1].item()
    v = torch.cat([
        torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g),  # subnormals to 1e5
        grid[::97], grid[::89] + grid[::89].abs() * 2**-12,  # exact values, and between neighbours
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, top, -top]),
    ])
    v = v[v.abs() <= top]
    up, down = round_directed(v, dtype, up=True).float(), round_directed(v, dtype, up=False).float()
    assert torch.equal(up, grid[torch.searchsorted(grid, v, right=False)])
    assert torch.equal(down, grid[torch.searchsorted(grid, v, right=True) - 1])
    overflow = {torch.float16: 1e5, torch.bfloat16: 3.4e38}[dtype]  # rounds to +-inf to nearest
    beyond = torch.tensor([overflow, -overflow])
    for up in (True, False):  # out of range stays out of range, for check_representable to report
        assert torch.equal(round_directed(beyond, dtype, up).float(), beyond.sign() * float("inf"))
