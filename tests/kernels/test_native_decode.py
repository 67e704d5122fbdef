"""The C++ CPU decode kernel against the float64 reference over the whole dequantized cache."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtuner.kernels import decode_attention
from kvtuner.kernels.native import decode_attention_native, native_available, native_supported
from kvtuner.kernels.reference import decode_attention_reference
from kvtuner.quant import QuantSpec, quantize, reserve_tokens, slice_tokens
from kvtuner.quant.codebook import snap_levels

pytestmark = pytest.mark.skipif(not native_available(warn=False),
                                reason="the C++ CPU decode kernel does not build here (g++ and ninja are needed)")

LAYOUTS = {
    "K4V2": (QuantSpec(4, 32, "channel"), QuantSpec(2, 32, "token")),
    "K2V4": (QuantSpec(2, 64, "channel"), QuantSpec(4, 16, "token")),
    "K8V8": (QuantSpec(8, 32, "channel"), QuantSpec(8, 64, "token")),
    "KV3-g16": (QuantSpec(3, 16, "channel"), QuantSpec(3, 16, "token")),
    "per_token": (QuantSpec(8, 64, "token"), QuantSpec(4, 32, "token")),
    "symmetric": (QuantSpec(4, 32, "token", symmetric=True), QuantSpec(4, 32, "token", symmetric=True)),
    "fp8": (QuantSpec(8, 64, "token", fp8="e4m3"), QuantSpec(8, 64, "token", fp8="e5m2")),
    "bf16-scales": (QuantSpec(4, 32, "channel", scale_dtype=torch.bfloat16),
                    QuantSpec(2, 32, "token", scale_dtype=torch.float32)),
}


def case(specs, n_hist, n_res, ratio=3, d=64, b=2, h=3, levels=(None, None), seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    hist_k = torch.randn(b, h, n_hist, d, generator=g) * 2 + offset
    hist_k[..., 5] += 6  # an outlier channel
    qkeys = quantize(hist_k, specs[0], levels=levels[0])
    qvalues = quantize(torch.randn(b, h, n_hist, d, generator=g), specs[1], levels=levels[1])
    return dict(query=torch.randn(b, h * ratio, d, generator=g), qkeys=qkeys, qvalues=qvalues,
                keys=torch.randn(b, h, n_res, d, generator=g), values=torch.randn(b, h, n_res, d, generator=g),
                scale=d**-0.5)


def check(args, history_start=0, tolerance=2e-5):
    got = decode_attention_native(**args, history_start=history_start)
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, history_start=history_start,
                                     compute_dtype=torch.float64)
    assert got.dtype == args["query"].dtype and got.shape == args["query"].shape
    error = (got.double() - ref).abs().max() / ref.abs().max()
    assert error < tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout(layout):
    assert native_supported(*[quantize(torch.randn(1, 1, 64, 64), s) for s in LAYOUTS[layout]], 64)
    check(case(LAYOUTS[layout], 1088, 17))


@pytest.mark.parametrize("ratio", [1, 3, 7, 8])
@pytest.mark.parametrize("d", [64, 128, 40])  # 40: not a multiple of 16, the scalar unpack
def test_gqa_ratios_and_head_dims(ratio, d):
    specs = (QuantSpec(4, 32, "channel"), QuantSpec(2, 8, "token"))
    check(case(specs, 320, 5, ratio=ratio, d=d))


def test_codebooks():
    levels = (snap_levels(15 * torch.linspace(0, 1, 16) ** 1.7, 4), snap_levels(3 * torch.linspace(0, 1, 4) ** 0.6, 2))
    check(case(LAYOUTS["K4V2"], 256, 5, levels=levels))


@pytest.mark.parametrize("start", [1, 33, 600, 2112])
def test_history_start_and_splits(start, two_threads):
    """Sink slots skipped inside a key group and inside a tile, with the history split four ways over two threads
    (1, 33: splits of at least 512 tokens) or two ways (600), and the whole history skipped (residual only)."""
    check(case(LAYOUTS["K4V2"], 2112, 4, b=1, h=1, seed=start), history_start=start)


def test_no_residual_and_one_token_history_group():
    check(case(LAYOUTS["K4V2"], 2048, 0, b=1))
    check(case(LAYOUTS["per_token"], 1, 3))


def test_strided_history_views_of_a_buffer():
    """The cache hands the kernel slices of code buffers with room to spare (rows contiguous, batch strides not)."""
    args = case(LAYOUTS["K4V2"], 256, 6)
    for side in ("qkeys", "qvalues"):
        args[side] = slice_tokens(reserve_tokens(args[side], 512), 0, 256)
        assert not args[side].payload.is_contiguous()
    check(args)


def test_huge_scores_and_a_large_common_offset():
    args = case(LAYOUTS["K4V2"], 512, 3, offset=500.0)
    args["query"] = args["query"] * 300  # scores in the thousands: the running max keeps exp2 in range
    got = decode_attention_native(**args)
    ref = decode_attention_reference(**args)
    assert torch.isfinite(got).all() and torch.allclose(got, ref, atol=2e-3)


def test_nothing_to_attend_to_is_an_error():
    with pytest.raises(RuntimeError, match="nothing to attend"):
        decode_attention_native(**case(LAYOUTS["K4V2"], 64, 0), history_start=64)


def test_dispatch():
    """``auto`` on CPU runs the kernel where it reads the layout; forcing it elsewhere is a clear error."""
    args = case(LAYOUTS["K4V2"], 256, 3)
    specs = (args["qkeys"].spec, args["qvalues"].spec)
    native = decode_attention(**args, key_spec=specs[0], value_spec=specs[1], backend="native")
    assert torch.equal(decode_attention(**args, key_spec=specs[0], value_spec=specs[1]), native)
    channel_values = case((QuantSpec(4, 32, "channel"), QuantSpec(4, 32, "channel")), 64, 3)
    assert not native_supported(channel_values["qkeys"], channel_values["qvalues"], 64)
    with pytest.raises(ValueError, match="use backend='torch'"):
        decode_attention(**channel_values, key_spec=specs[0], value_spec=QuantSpec(4, 32, "channel"), backend="native")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k_bits=st.sampled_from([2, 3, 4, 8]), v_bits=st.sampled_from([2, 3, 4, 8]),
       k_group=st.sampled_from([8, 16, 24, 32, 48, 64]), v_group=st.sampled_from([8, 16, 32, 64]),
       groups=st.integers(1, 12), residual=st.integers(0, 33), ratio=st.integers(1, 4), heads=st.integers(1, 3),
       scale_exp=st.integers(-12, 6), narrow=st.booleans(), seed=st.integers(0, 2**16))
def test_hypothesis_against_reference(k_bits, v_bits, k_group, v_group, groups, residual, ratio, heads, scale_exp,
                                      narrow, seed):
    """Random layouts, tiny and huge magnitudes, groups offset far from zero with a narrow spread."""
    g = torch.Generator().manual_seed(seed)
    n = groups * k_group
    magnitude = 2.0**scale_exp
    hist_k = torch.randn(1, heads, n, 64, generator=g) * magnitude
    hist_v = torch.randn(1, heads, n, 64, generator=g) * magnitude
    if narrow:  # offset-narrow groups: the zero carries almost all of the value
        hist_k, hist_v = hist_k * 1e-3 + 40 * magnitude, hist_v * 1e-3 - 40 * magnitude
    specs = (QuantSpec(k_bits, k_group, "channel", scale_dtype=torch.float32),
             QuantSpec(v_bits, v_group, "token", scale_dtype=torch.float32))
    args = dict(query=torch.randn(1, heads * ratio, 64, generator=g), qkeys=quantize(hist_k, specs[0]),
                qvalues=quantize(hist_v, specs[1]), keys=torch.randn(1, heads, residual, 64, generator=g) * magnitude,
                values=torch.randn(1, heads, residual, 64, generator=g) * magnitude, scale=64**-0.5)
    got = decode_attention_native(**args)
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, compute_dtype=torch.float64)
    # an output is a weighted mean of values: float32 rounding scales with the largest value, not the mean
    largest = torch.cat([args["qvalues"].dequantize(), args["values"]], dim=-2).abs().max()
    assert (got.double() - ref).abs().max() <= 3e-5 * largest


def test_inconsistent_shapes_are_refused_not_read():
    """The op is public: a batch, head or head-dim mismatch is an error, never a read past a buffer."""
    args = case(LAYOUTS["K4V2"], 64, 2, b=1, h=1, ratio=1)
    with pytest.raises(RuntimeError, match="batch"):
        decode_attention_native(**{**args, "query": torch.randn(4, 1, 64)})
    with pytest.raises(RuntimeError, match="full-precision keys"):
        decode_attention_native(**{**args, "keys": torch.randn(1, 1, 2, 32), "values": torch.randn(1, 1, 2, 32)})
    narrow = quantize(torch.randn(1, 1, 64, 32), QuantSpec(2, 32, "token"))
    with pytest.raises(RuntimeError, match="fewer than head_dim codes|value groups|scales"):
        decode_attention_native(**{**args, "qvalues": narrow})


def test_nan_in_the_residual_reaches_the_output():
    """A NaN the model produced is not hidden by the kernel (the reference propagates it too)."""
    args = case(LAYOUTS["K4V2"], 64, 2, b=1, h=1, ratio=1)
    args["values"][0, 0, 1, 3] = float("nan")
    assert torch.isnan(decode_attention_native(**args)[0, 0, 3])


def test_a_kernel_that_cannot_build_leaves_auto_on_the_torch_path(monkeypatch):
    """No compiler: ``auto`` warns once and streams in torch; a forced ``native`` says why it cannot run."""
    import kvtuner.kernels.native as native

    monkeypatch.setattr(native, "_build_error", lambda: "RuntimeError: g++: not found")
    native._warn_once.cache_clear()
    args = case(LAYOUTS["K4V2"], 256, 3)
    specs = dict(key_spec=args["qkeys"].spec, value_spec=args["qvalues"].spec)
    with pytest.warns(UserWarning, match="g\\+\\+: not found.*torch path"):
        got = decode_attention(**args, **specs)
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, compute_dtype=torch.float64)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=2e-6)  # float32 sums: ~1e-6 off, as the float32 reference
    with pytest.raises(RuntimeError, match="could not be built: RuntimeError: g\\+\\+: not found"):
        decode_attention(**args, **specs, backend="native")
    native._warn_once.cache_clear()
