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
    assert method.packed_decode_supported()  # the kernel attends the sink beside the residual


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


def test_pre_rope_stores_the_unrotated_keys():
    """What is quantized is R^T k: reading back without the re-rotation gives the pre-RoPE keys, to 8-bit error."""
    pre, post, positions = keys_with_outlier_channel(tokens=32)
    method = KVMethod(LayerSpec("kivi", 8, 16, 32, 32, pre_rope=True), inv_freq=INV_FREQ)
    stored = method.quantize(post, post, 0, positions)
    unrotated = stored.keys.codes.dequantize()
    step = stored.keys.codes.scale.float().max()
    assert (unrotated - pre).abs().max() <= step / 2 + 1e-4  # half a step of the pre-RoPE grid
    assert (method.dequantize(stored, 0, positions, torch.float32)[0] - post).abs().max() <= step  # re-rotated


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


def test_kvquant_keys_store_bare_codes_over_the_calibrated_range():
    torch.manual_seed(6)
    k, v = torch.randn(2, 2, 32, D), torch.randn(2, 2, 32, D)
    lo, hi = k.amin(dim=(0, 2), keepdim=True), k.amax(dim=(0, 2), keepdim=True)  # [1, H, 1, D]
    spec = LayerSpec("kvquant", 4, 4, 32, 32)
    method = KVMethod(spec, SideCalibration(lo=lo, hi=hi), SideCalibration())
    stored = method.quantize(k, v, 0, torch.arange(32)[None])
    assert stored.keys.codes.scale is None and stored.keys.codes.zero is None  # nothing per group
    assert stored.values.codes.scale.shape == (2, 2, 32, 1)  # one group per token and head
    got_k, _ = method.dequantize(stored, 0, torch.arange(32)[None], torch.float32)
    step = (hi - lo) / 15
    assert torch.all((got_k - k).abs() <= step / 2 * (1 + 1e-5) + 1e-6)  # uniform levels: half a step
    assert not method.packed_decode_supported()
    assert method.table_bytes() == 2 * 2 * D * 4  # the range is a per-layer table (fp32 lo and hi)


def test_kvquant_per_channel_levels():
    torch.manual_seed(7)
    k = torch.randn(1, 2, 64, D)
    lo, hi = k.amin(dim=(0, 2), keepdim=True), k.amax(dim=(0, 2), keepdim=True)
    levels = torch.sort(torch.rand(2, D, 4) * 3, dim=-1).values
    levels[..., 0], levels[..., -1] = 0, 3
    method = KVMethod(LayerSpec("kvquant", 2, 16, 32, 32, codebook=True), SideCalibration(levels.half(), lo, hi))
    got, _ = method.roundtrip(k, k)
    y = (k - lo) / ((hi - lo) / 3)
    table = levels.half().float()
    nearest = (y.permute(1, 3, 0, 2)[..., None] - table[:, :, None, None, :]).abs().argmin(-1)  # [H, D, B, T]
    expected = lo + table.gather(-1, nearest.flatten(2)).reshape(nearest.shape).permute(2, 0, 3, 1) * (hi - lo) / 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_outlier_leaves_its_group_range_to_the_inliers():
    """Dense-and-sparse: the group holding an outlier is quantized over its inliers' range, as if it were absent."""
    torch.manual_seed(9)
    v = torch.randn(1, 2, 32, D)
    spiked = v.clone()
    spiked[0, 1, 4, 3] = 40.0
    cal = SideCalibration(lo=torch.tensor(-5.0), hi=torch.tensor(5.0))
    method = KVMethod(LayerSpec("kivi", 16, 2, 32, 32, outliers=0.01), None, cal)
    got, want = method.roundtrip(spiked, spiked)[1], method.roundtrip(v, v)[1]
    assert got[0, 1, 4, 3] == 40.0
    others = torch.ones_like(v, dtype=torch.bool)
    others[0, 1, 4, :] = False  # the spiked token's group is re-fitted; every other group is untouched
    assert torch.equal(got[others], want[others])
    assert (got[0, 1, 4] - v[0, 1, 4]).abs()[torch.arange(D) != 3].max() < 1.0  # inlier range, not 45 wide


def test_bare_kvquant_codes_refuse_a_generic_read():
    k = torch.randn(1, 2, 32, D)
    lo, hi = k.amin(dim=(0, 2), keepdim=True), k.amax(dim=(0, 2), keepdim=True)
    stored = KVMethod(LayerSpec("kvquant", 4, 16), SideCalibration(lo=lo, hi=hi)).quantize(k, k, 0, torch.arange(32)[None])
    with pytest.raises(ValueError, match="through kvtuner.method.KVMethod.dequantize"):
        stored.keys.codes.dequantize()
