"""MixedPrecisionLayer's storage: code buffers written in place."""

import torch

from kvtuner.cache.layer import MixedPrecisionLayer


def test_flushes_write_into_buffers_that_grow_geometrically():
    """160 one-token steps after a 64-token prompt: every flush lands in place except a few growths, the
    history reads back as one quantization of the same tokens, and nbytes counts stored bytes only."""
    from kvtuner.config import LayerSpec
    from kvtuner.method import KVMethod

    torch.manual_seed(3)
    method = KVMethod(LayerSpec("kivi", 4, 2, 16, 16))
    layer = MixedPrecisionLayer(method)
    k, v = torch.randn(1, 2, 224, 32), torch.randn(1, 2, 224, 32)
    layer.update(k[..., :64, :], v[..., :64, :])
    growths, pointer = 0, None
    for t in range(64, 224):
        layer.update(k[..., t : t + 1, :], v[..., t : t + 1, :])
        if layer._buffers is not None and layer._buffers[0].payload.data_ptr() != pointer:
            growths, pointer = growths + 1, layer._buffers[0].payload.data_ptr()
    assert layer.quantized_length == 224 and 1 <= growths <= 4  # 64 -> 96 -> 144 -> 216 -> 324: not 10 copies
    want_k, want_v = method.roundtrip(k, v)
    got_k, got_v = layer.dequantized_history()
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    compact = method.quantize(k, v, 0, torch.arange(224)[None]).nbytes()
    assert layer.nbytes() == compact + layer.keys.numel() * 4 * 2  # stored codes + the (empty) residual
    assert layer.reserved_nbytes() >= compact
    layer.batch_select_indices(torch.tensor([0]))  # a batch op leaves a compact history; the next flush reserves again
    assert layer._buffers is None
    layer.update(k[..., :16, :], v[..., :16, :])
    assert layer.quantized_length == 240
