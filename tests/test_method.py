"""The method seam: what each option stores and reads back, on plain tensors."""

import pytest
import torch

from kvtuner.config import KVConfigError, LayerSpec, ModelFingerprint
from kvtuner.method import Calibration, KVMethod, SideCalibration, StoredKV
from kvtuner.quant.rope import rotate

D = 32
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def keys_with_outlier_channel(tokens=64, seed=0):
    """Pre-RoPE keys with a large fixed channel (as real keys have), and the same keys after RoPE."""
    torch.manual_seed(seed)
    pre = torch.randn(2, 2, tokens, D)
    pre[..., 3] += 20
    positions = torch.arange(tokens)[None]
    return pre, rotate(pre, positions, INV_FREQ), positions


def test_plain_kivi_roundtrip_is_the_grouped_quantizer():
    from kvtuner.quant import quantize

    k = torch.randn(1, 2, 64, D)
    v = torch.randn(1, 2, 64, D)
    method = KVMethod(LayerSpec("kivi", 4, 2, 16, 32))
    got_k, got_v = method.roundtrip(k, v)
    assert torch.equal(got_k, quantize(k, method.key_spec).dequantize())
    assert torch.equal(got_v, quantize(v, method.value_spec).dequantize())
    assert method.packed_decode_supported()


def test_roundtrip_leaves_out_a_partial_window():
    k = torch.randn(1, 1, 70, D)
    got, _ = KVMethod(LayerSpec("kivi", 4, 4, 16, 32)).roundtrip(k, k)
    assert got.shape[-2] == 64


def test_sink_tokens_come_back_exactly_and_leave_the_group_statistics_alone():
    torch.manual_seed(1)
    k, v = torch.randn(1, 2, 32, D), torch.randn(1, 2, 32, D)
    huge = k.clone()
    huge[..., 0, :] = 1000.0  # a sink token far outside the others' range
    method = KVMethod(LayerSpec("kivi", 2, 2, 32, 32, sink=1))
    got_k, got_v = method.roundtrip(huge, v)
    assert torch.equal(got_k[..., 0, :], huge[..., 0, :]) and torch.equal(got_v[..., 0, :], v[..., 0, :])
    plain_k, _ = method.roundtrip(k, v)
    assert torch.equal(got_k[..., 1:, :], plain_k[..., 1:, :])  # token 0 did not widen any key group
    assert not method.packed_decode_supported()


def test_sink_across_blocks_matches_one_pass():
    """The cache stores windows one by one; a sink longer than a window spans two of them."""
    torch.manual_seed(2)
    k, v = torch.randn(1, 2, 64, D), torch.randn(1, 2, 64, D)
    method = KVMethod(LayerSpec("kivi", 4, 4, 16, 16, sink=20))
    positions = torch.arange(64)[None]
    history = None
    for start in range(0, 64, 16):
        block = method.quantize(k[..., start:start + 16, :], v[..., start:start + 16, :], start, positions[:, start:start + 16])
        history = block if history is None else history.append(block)
    got_k, got_v = method.dequantize(history, 0, positions, torch.float32)
    want_k, want_v = method.roundtrip(k, v)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert torch.equal(got_k[..., :20, :], k[..., :20, :])


def test_pre_rope_keys_keep_the_outlier_channel_and_halve_the_error():
    pre, post, positions = keys_with_outlier_channel()
    v = torch.randn_like(post)
    plain = KVMethod(LayerSpec("kivi", 2, 2, 32, 32))
    pre_rope = KVMethod(LayerSpec("kivi", 2, 2, 32, 32, pre_rope=True), inv_freq=INV_FREQ)
    err_plain = (plain.roundtrip(post, v, positions)[0] - post).norm()
    err_pre = (pre_rope.roundtrip(post, v, positions)[0] - post).norm()
    assert err_pre < 0.5 * err_plain
    assert torch.equal(pre_rope.roundtrip(post, v, positions)[1], plain.roundtrip(post, v, positions)[1])


def test_pre_rope_round_trip_is_exact_without_quantization_error():
    """With 8-bit keys on values that sit on the grid, only the rotation is left: it undoes itself."""
    _, post, positions = keys_with_outlier_channel(tokens=32)
    method = KVMethod(LayerSpec("kivi", 8, 8, 32, 32, pre_rope=True), inv_freq=INV_FREQ)
    got, _ = method.roundtrip(post.double(), post.double(), positions)
    assert (got - post.double()).abs().max() < 0.1  # 8-bit steps of a range ~40: ~0.08 at most


def test_pre_rope_needs_the_frequencies():
    with pytest.raises(KVConfigError, match="rotary frequencies"):
        KVMethod(LayerSpec("kivi", 4, 4, pre_rope=True))


def test_outliers_are_exact_and_counted():
    torch.manual_seed(3)
    k, v = torch.randn(1, 2, 32, D), torch.randn(1, 2, 32, D)
    k[0, 0, 5, 7] = 50.0
    cal = SideCalibration(lo=torch.full((1, 2, 1, D), -3.0), hi=torch.full((1, 2, 1, D), 3.0))
    method = KVMethod(LayerSpec("kivi", 2, 2, 32, 32, outliers=0.01), cal, SideCalibration(lo=torch.tensor(-3.0),
                                                                                             hi=torch.tensor(3.0)))
    stored = method.quantize(k, v, 0, torch.arange(32)[None])
    got_k, _ = method.dequantize(stored, 0, torch.arange(32)[None], torch.float32)
    assert got_k[0, 0, 5, 7] == 50.0
    plain = KVMethod(LayerSpec("kivi", 2, 2, 32, 32))
    inliers = k.abs() <= 3
    assert (got_k - k)[inliers].abs().max() < (plain.roundtrip(k, v)[0] - k)[inliers].abs().max()
    n = stored.keys.outliers.count + stored.values.outliers.count
    assert stored.nbytes() == plain.quantize(k, v, 0, torch.arange(32)[None]).nbytes() + 4 * n + 2 * 4 * 2


def test_calibration_requirements_are_clear():
    spec = LayerSpec("kivi", 3, 3, codebook=True)
    with pytest.raises(KVConfigError, match="codebook levels are missing"):
        KVMethod(spec)
    cal = Calibration(model=ModelFingerprint("llama", 2, 2, D))
    with pytest.raises(KVConfigError, match="no codebook 'k:kivi:g32:b3:post:o0'.*kvtuner calibrate"):
        cal.side(0, spec, "k")


def test_batch_operations_keep_every_part():
    torch.manual_seed(4)
    k, v = torch.randn(3, 2, 32, D), torch.randn(3, 2, 32, D)
    cal = SideCalibration(lo=torch.full((1, 2, 1, D), -2.0), hi=torch.full((1, 2, 1, D), 2.0))
    method = KVMethod(LayerSpec("kivi", 2, 2, 32, 32, sink=1, outliers=0.02), cal,
                      SideCalibration(lo=torch.tensor(-2.0), hi=torch.tensor(2.0)))
    positions = torch.arange(32)[None]
    stored: StoredKV = method.quantize(k, v, 0, positions)
    picked = stored.map(lambda t: t.index_select(0, torch.tensor([2, 0])))
    alone = method.quantize(k[[2, 0]], v[[2, 0]], 0, positions)
    for a, b in zip(method.dequantize(picked, 0, positions, torch.float32),
                    method.dequantize(alone, 0, positions, torch.float32)):
        assert torch.equal(a, b)
