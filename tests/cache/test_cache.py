import pytest
import torch
from transformers import DynamicCache

from kvtuner import KVConfig, KVConfigError, LayerSpec, MixedPrecisionCache
from kvtuner.cache import MixedPrecisionLayer, cache_kwargs
from kvtuner.method import KVMethod
from kvtuner.quant import packed_width

N_LAYERS = 3


def uniform(kv, **kw):
    kw.setdefault("group_size", 8)
    kw.setdefault("residual_length", 8)
    return KVConfig.uniform(kv, N_LAYERS, **kw)


def ids(batch=1, length=40, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def gen(model, cache, inputs, **kw):
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, **({} if cache is None else cache_kwargs(model, cache)), pad_token_id=0, **kw)


def test_16_bit_specs_match_dynamic_cache_exactly(tiny_model):
    x = ids(2, 37)
    ref = gen(tiny_model, DynamicCache(), {"input_ids": x}, output_scores=True, return_dict_in_generate=True)
    cache = MixedPrecisionCache(uniform("fp16"), tiny_model.config)
    out = gen(tiny_model, cache, {"input_ids": x}, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def test_kv8_stays_close_to_full_precision(tiny_model):
    x = ids(1, 50)
    with torch.no_grad():
        ref = tiny_model(x).logits
        cache = MixedPrecisionCache(uniform("KV8"), tiny_model.config)
        got = torch.cat([tiny_model(x[:, s : s + 8], **cache_kwargs(tiny_model, cache)).logits for s in range(0, 50, 8)], 1)
    assert (got - ref).norm() / ref.norm() < 5e-3
    assert not torch.equal(got, ref)  # the history really was quantized


@pytest.mark.parametrize("kv,method", [("K4V2", "kivi"), ("KV2", "kivi"), ("K3V4", "kivi"), ("KV4", "per_token"), ("KV8", "fp8"),
                                       ("KV2+sink1+prerope", "kivi"), ("K4V2+sink3", "per_token")])
def test_generate_greedy_sampling_beam(tiny_llama, kv, method):
    x = ids(1, 30)
    cfg = uniform(kv, method=method)
    out = gen(tiny_llama, MixedPrecisionCache(cfg, tiny_llama.config), {"input_ids": x})
    assert out.shape == (1, 42)
    torch.manual_seed(0)
    out = gen(tiny_llama, MixedPrecisionCache(cfg, tiny_llama.config), {"input_ids": x}, do_sample=True, top_k=5)
    assert out.shape == (1, 42)
    cache = MixedPrecisionCache(cfg, tiny_llama.config)
    out = gen(tiny_llama, cache, {"input_ids": x}, num_beams=3, num_return_sequences=2)
    assert out.shape == (2, 42)
    assert cache.layers[0].history.keys.codes.shape[0] == 3  # one history per beam, reordered in place


def test_beam_search_16_bit_matches_dynamic_cache(tiny_llama):
    x = ids(1, 21)
    ref = gen(tiny_llama, None, {"input_ids": x}, num_beams=3)
    out = gen(tiny_llama, MixedPrecisionCache(uniform("fp16"), tiny_llama.config), {"input_ids": x}, num_beams=3)
    assert torch.equal(out, ref)


def test_batch_with_left_padding_matches_unpadded_rows(tiny_llama):
    """Each row of a left-padded batch decodes as the same row alone would, up to quantization of pad tokens."""
    long, short = ids(1, 32, 1), ids(1, 24, 2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 32), torch.cat([torch.zeros(1, 8), torch.ones(1, 24)], 1)]).long()
    cfg = uniform("KV8")
    out = gen(tiny_llama, MixedPrecisionCache(cfg, tiny_llama.config), {"input_ids": batch, "attention_mask": mask})
    alone = gen(tiny_llama, MixedPrecisionCache(cfg, tiny_llama.config), {"input_ids": long})
    assert torch.equal(out[0], alone[0])
    assert out.shape == (2, 44)


def test_residual_window_rule():
    """Prefill keeps only the tail in full precision; decode flushes whole windows."""
    layer = MixedPrecisionLayer(KVMethod(LayerSpec("kivi", 4, 2, group_size=8, residual_length=16)))
    k = torch.randn(2, 3, 37, 16)
    keys, values = layer.update(k, k.clone())
    assert torch.equal(keys, k)  # the prompt attends to itself in full precision
    assert layer.quantized_length == 32 and layer.keys.shape[-2] == 5
    for step in range(11):
        layer.update(torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16))
    assert layer.quantized_length == 48 and layer.keys.shape[-2] == 0
    assert layer.get_seq_length() == 48


def test_nbytes_are_real_and_exact():
    b, h, d, g = 2, 3, 64, 32
    layer = MixedPrecisionLayer(KVMethod(LayerSpec("kivi", 4, 2, group_size=g, residual_length=32)))
    x = torch.randn(b, h, 70, d)
    layer.update(x, x)
    q_tokens, r_tokens = 64, 6
    keys = b * h * q_tokens * packed_width(d, 4) * 4 + 2 * b * h * (q_tokens // g) * d * 2
    values = b * h * q_tokens * packed_width(d, 2) * 4 + 2 * b * h * q_tokens * (d // g) * 2
    residual = 2 * b * h * r_tokens * d * 4  # fp32 model dtype
    assert layer.nbytes() == keys + values + residual


def test_cache_nbytes_ratio_k4v4(tiny_llama):
    cache = MixedPrecisionCache(KVConfig.uniform("KV4", N_LAYERS, group_size=16), tiny_llama.config)
    with torch.no_grad():
        tiny_llama(ids(1, 256), **cache_kwargs(tiny_llama, cache))
    # 256 tokens flushed in windows of 32: no residual left; 4 bits + fp16 scale and zero per 16 = 6 bits
    assert cache.nbytes() / cache.nbytes_fp16() == pytest.approx(6 / 16)


def test_crop_within_residual_is_exact_and_into_history_requantizes(tiny_llama):
    cache = MixedPrecisionCache(uniform("K4V2"), tiny_llama.config)
    with torch.no_grad():
        tiny_llama(ids(1, 30), **cache_kwargs(tiny_llama, cache))
    layer = cache.layers[0]
    assert (layer.quantized_length, layer.keys.shape[-2]) == (24, 6)
    k_before = layer.dequantized_history()[0].clone()
    cache.crop(-4)
    assert cache.get_seq_length() == 26 and layer.keys.shape[-2] == 2
    cache.crop(19)  # legacy absolute length
    assert cache.get_seq_length() == 19 and layer.quantized_length == 16 and layer.keys.shape[-2] == 3
    assert torch.allclose(layer.dequantized_history()[0], k_before[..., :16, :], atol=1e-2)
    with torch.no_grad():  # still usable
        tiny_llama(ids(1, 5), **cache_kwargs(tiny_llama, cache))
    assert cache.get_seq_length() == 24


def test_layer_types_beyond_full_and_sliding_are_refused_when_quantized():
    """Llama 4's chunked attention sees only its own chunk: kvtuner does not model that, so it refuses to quantize it
    (sliding-window layers are quantized: tests/cache/test_sliding.py)."""
    from transformers import Llama4TextConfig

    cfg = Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=8)
    with pytest.raises(KVConfigError, match="layer 0 is a 'chunked_attention' layer"):
        MixedPrecisionCache(KVConfig.uniform("KV4", 4), cfg)
    specs = [LayerSpec("fp16")] * 3 + [LayerSpec("kivi", 4, 4)]
    assert type(MixedPrecisionCache(KVConfig(specs), cfg).layers[3]).__name__ == "MixedPrecisionLayer"


def test_group_must_divide_head_dim(tiny_llama):
    with pytest.raises(KVConfigError, match="layer 0: group_size 32 does not divide head_dim 16"):
        MixedPrecisionCache(KVConfig.uniform("KV4", N_LAYERS), tiny_llama.config)


def test_layer_count_must_match_model(tiny_llama):
    with pytest.raises(KVConfigError, match="config has 2 layers but the model \\(llama\\) has 3"):
        MixedPrecisionCache(KVConfig.uniform("KV4", 2), tiny_llama.config)


def test_mixed_per_layer_specs(tiny_qwen2):
    cfg = KVConfig([LayerSpec("kivi", 8, 4, 8, 8), LayerSpec("fp16"), LayerSpec("per_token", 4, 2, 16, 0)])
    cache = MixedPrecisionCache(cfg, tiny_qwen2.config)
    out = gen(tiny_qwen2, cache, {"input_ids": ids(1, 20)})
    assert out.shape == (1, 32)
    assert [type(layer).__name__ for layer in cache.layers] == ["MixedPrecisionLayer", "DynamicLayer", "MixedPrecisionLayer"]
    assert 0 < cache.nbytes() < 2 * cache.nbytes_fp16()


def test_pre_rope_positions_follow_left_padding_and_stay_put(tiny_llama):
    """Where transformers passes position_ids to the cache (5.18+), a left-padded row is stored apart from its pads,
    its keys un-rotated at its own positions (from 0, as alone), and positions that start elsewhere are learned as
    an offset; either is learned once, so later position_ids cannot move stored keys."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.18"):
        pytest.skip("transformers < 5.18 passes no position_ids to the cache: positions are cache indices")
    short = ids(1, 24, 2)
    batch = torch.cat([ids(1, 32, 1), torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 32), torch.cat([torch.zeros(1, 8), torch.ones(1, 24)], 1)]).long()
    cache = MixedPrecisionCache(uniform("KV4+prerope"), tiny_llama.config)
    gen(tiny_llama, cache, {"input_ids": batch, "attention_mask": mask})
    layer = cache.layers[0]
    assert layer.pads.tolist() == [0, 8] and [row.position_offset.tolist() for row in layer.rows] == [[0], [0]]
    row = layer.rows[1]
    before = row.dequantized_history()[0].clone()
    row.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), kwargs={"position_ids": torch.tensor([[900]])})
    assert torch.equal(row.dequantized_history()[0][..., : before.shape[-2], :], before)
    shifted = MixedPrecisionCache(uniform("KV4+prerope"), tiny_llama.config).layers[0]
    shifted.update(torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), kwargs={"position_ids": torch.arange(100, 109)[None]})
    assert shifted.rows is None and shifted.position_offset.tolist() == [100, 100]
