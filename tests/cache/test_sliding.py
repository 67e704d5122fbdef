"""Sliding-window layers quantized: transformers' semantics exactly, bounded memory, and what they keep.

Conformance oracle: a layer whose sides are 16-bit keeps tokens as they are through the same windows, so
a cache of such layers must be bit for bit transformers' ``DynamicCache`` (``DynamicSlidingWindowLayer`` on
sliding layers) in every generate mode; any slip in the returned tokens, the mask sizes or the positions
shows up there.
"""

import pytest
import torch
from transformers import (DynamicCache, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          MistralConfig, MistralForCausalLM)
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from kvtuner import KVConfig, LayerSpec, MixedPrecisionCache
from kvtuner.cache import MixedPrecisionLayer, MixedPrecisionSlidingLayer, cache_kwargs
from kvtuner.cache.compat import layer_types
from kvtuner.method import KVMethod

WINDOW = 8
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=256)


def _seeded(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.fixture(scope="module")
def tiny_gemma3():
    """Gemma 3's layout in small: sliding and full layers, q/k norms, one KV head, per-type RoPE bases."""
    return _seeded(Gemma3ForCausalLM, Gemma3TextConfig(**TINY, head_dim=16, sliding_window=WINDOW,
                                                       layer_types=["sliding_attention", "full_attention"] * 2))


@pytest.fixture(scope="module")
def tiny_mistral():
    return _seeded(MistralForCausalLM, MistralConfig(**TINY, sliding_window=WINDOW))


@pytest.fixture(params=["gemma3", "mistral"])
def sliding_model(request, tiny_gemma3, tiny_mistral):
    return {"gemma3": tiny_gemma3, "mistral": tiny_mistral}[request.param]


def exact_cache(config, group=4, residual=4) -> Cache:
    """kvtuner's layers with 16-bit sides: they store tokens as they are, so they must equal DynamicCache."""
    layers = []
    for kind, kwargs in layer_types(config):
        method = KVMethod(LayerSpec("kivi", 16, 16, group, residual))
        layers.append(MixedPrecisionSlidingLayer(method, kwargs["sliding_window"]) if kind == "sliding_attention"
                      else MixedPrecisionLayer(method))
    return Cache(layers=layers)


def prompt(batch=1, length=21, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, cache, inputs, **kw):
    kw.setdefault("max_new_tokens", 14)
    kw.setdefault("do_sample", False)
    extra = {} if cache is None else cache_kwargs(model, cache)
    return model.generate(**inputs, **extra, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)


def assert_same(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def test_16_bit_layer_is_transformers_sliding_layer_step_by_step():
    """Any chunking, prompts longer than the window: identical K/V returned and identical mask sizes."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 120, 16, generator=g), torch.randn(2, 1, 120, 16, generator=g)
    ours = MixedPrecisionSlidingLayer(KVMethod(LayerSpec("kivi", 16, 16, 4, 8)), WINDOW)
    theirs = DynamicSlidingWindowLayer(WINDOW)
    t = 0
    for n in [13, 1, 1, 3, 1, 5, 1, 1, 1, 1, 1, 1, 20, 1, 1, 8, 1, 7, 1, 1]:
        assert ours.get_mask_sizes(n) == theirs.get_mask_sizes(n)
        got, want = ours.update(k[..., t : t + n, :], v[..., t : t + n, :]), theirs.update(k[..., t : t + n, :], v[..., t : t + n, :])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        t += n
        assert ours.get_seq_length() == theirs.get_seq_length() == t
        assert ours.nbytes() == 2 * k[..., : WINDOW - 1, :].numel() * 4  # exactly the window's W - 1 tokens


@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam"])
def test_16_bit_specs_generate_like_dynamic_cache(sliding_model, mode):
    kw = {"greedy": {}, "sampling": {"do_sample": True, "top_k": 5}, "beam": {"num_beams": 3}}[mode]
    x = {"input_ids": prompt()}
    torch.manual_seed(1)
    ref = generate(sliding_model, DynamicCache(config=sliding_model.config), x, **kw)
    for cache in (exact_cache(sliding_model.config), MixedPrecisionCache(KVConfig.uniform("fp16", 4), sliding_model.config)):
        torch.manual_seed(1)
        assert_same(generate(sliding_model, cache, x, **kw), ref)


def test_16_bit_specs_left_padded_batch_like_dynamic_cache(sliding_model):
    batch = torch.cat([prompt(1, 24, 1), torch.cat([torch.zeros(1, 7, dtype=torch.long), prompt(1, 17, 2)], 1)])
    mask = torch.cat([torch.ones(1, 24), torch.cat([torch.zeros(1, 7), torch.ones(1, 17)], 1)]).long()
    x = {"input_ids": batch, "attention_mask": mask}
    assert_same(generate(sliding_model, exact_cache(sliding_model.config), x),
                generate(sliding_model, DynamicCache(config=sliding_model.config), x))


def test_16_bit_crop_with_past_recording_like_transformers(sliding_model):
    """Assisted decoding's rollback: record the past, run ahead, crop back; then both caches continue alike."""
    ours, theirs = exact_cache(sliding_model.config), DynamicCache(config=sliding_model.config)
    steps = prompt(1, 40, 3)
    logits = []
    for cache in (ours, theirs):
        kw = cache_kwargs(sliding_model, cache)
        with torch.no_grad():
            sliding_model(steps[:, :20], **kw)
            cache.activate_past_recording()
            sliding_model(steps[:, 20:26], **kw)
            cache.crop(-4)
            cache.crop(0)
            logits.append(sliding_model(steps[:, 22:30], **kw).logits)
    assert torch.equal(logits[0], logits[1])
    assert ours.get_seq_length() == theirs.get_seq_length() == 30


def test_crop_into_dropped_tokens_is_refused():
    layer = MixedPrecisionSlidingLayer(KVMethod(LayerSpec("kivi", 4, 4, 4, 4)), WINDOW)
    layer.update(torch.randn(1, 1, 30, 16), torch.randn(1, 1, 30, 16))
    assert layer.first_token == 20  # positions 23..29 are visible next: groups before 20 are gone
    layer.crop(-2)  # the window now reaches back to 21: still stored
    with pytest.raises(RuntimeError, match="dropped"):
        layer.crop(-4)


@pytest.mark.parametrize("spec", [LayerSpec("kivi", 4, 2, 4, 8), LayerSpec("per_token", 4, 4, 8, 4),
                                  LayerSpec("kivi", 2, 2, 4, 4, sink=2), LayerSpec("kivi", 4, 4, 4, 4, pre_rope=True)],
                         ids=lambda s: f"{s.method}-{s.label}")
@pytest.mark.parametrize("window", [12, 3])
def test_quantized_layer_keeps_what_the_window_sees_and_stays_bounded(spec, window):
    """float64 keys through random chunks: every update returns, for the positions the window shows, the
    reference's quantized tokens where they were flushed and the exact ones elsewhere; storage never exceeds
    the window plus one stored group and the residual, and drops only whole groups."""
    g = torch.Generator().manual_seed(window)
    length, d = 300, 16
    k, v = torch.randn(2, 1, length, d, generator=g, dtype=torch.float64), torch.randn(2, 1, length, d, generator=g, dtype=torch.float64)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).double() / d) if spec.pre_rope else None
    method = KVMethod(spec, inv_freq=inv_freq)
    ref_k, ref_v = method.roundtrip(k, v)  # each window quantized on its own, as the cache flushes it
    layer = MixedPrecisionSlidingLayer(method, window)
    unit = method.quantize(k[..., : spec.window, :], v[..., : spec.window, :], 0, torch.arange(spec.window)[None]).token_unit
    assert unit == (4 if spec.method == "kivi" else 1)  # a key group; per-token layouts drop token by token
    lengths = torch.randint(1, 11, (200,), generator=g).tolist()
    t = 0
    token_bytes = 2 * 2 * d * 8  # K and V, batch 2, float64
    for n in lengths:
        if t + n > length:
            break
        flushed = (t // spec.window) * spec.window  # tokens quantized before this update
        lo = max(t - window + 1, 0)
        keys, values = layer.update(k[..., t : t + n, :], v[..., t : t + n, :])
        want_k = torch.cat([ref_k[..., lo:flushed, :], k[..., max(lo, flushed) : t + n, :]], dim=-2)
        want_v = torch.cat([ref_v[..., lo:flushed, :], v[..., max(lo, flushed) : t + n, :]], dim=-2)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        t += n
        assert layer.first_token % unit == 0
        stored = t - layer.first_token  # history + residual
        assert stored < window + unit + spec.window
        assert layer.nbytes() <= stored * token_bytes  # packed, never more than the float64 tokens
        assert layer.reserved_nbytes() <= 2 * (window + unit + spec.window) * token_bytes
    assert t > 250 and layer.first_token > 200


def test_quantized_sliding_layers_generate_in_every_mode(tiny_gemma3):
    cfg = KVConfig.uniform("K4V2", 4, group_size=4, residual_length=4)
    x = prompt(1, 30)
    cache = MixedPrecisionCache(cfg, tiny_gemma3.config)
    assert [type(layer).__name__ for layer in cache.layers] == ["MixedPrecisionSlidingLayer", "MixedPrecisionLayer"] * 2
    assert generate(tiny_gemma3, cache, {"input_ids": x}).sequences.shape == (1, 44)
    assert cache.layers[0].first_token == 36 and cache.layers[1].first_token == 0
    torch.manual_seed(0)
    out = generate(tiny_gemma3, MixedPrecisionCache(cfg, tiny_gemma3.config), {"input_ids": x}, do_sample=True, top_k=5)
    assert out.sequences.shape == (1, 44)
    cache = MixedPrecisionCache(cfg, tiny_gemma3.config)
    out = generate(tiny_gemma3, cache, {"input_ids": x}, num_beams=3, num_return_sequences=2)
    assert out.sequences.shape == (2, 44) and cache.layers[0].history.keys.codes.shape[0] == 3


def test_quantized_left_padded_batch_matches_rows_alone(tiny_mistral):
    """Sliding layers are ragged too: a padded row keeps its own window, drops its own groups and decodes as alone."""
    long, short = prompt(1, 32, 1), prompt(1, 23, 2)  # 9 pads: the short row's groups of 4 start off the long one's
    batch = torch.cat([long, torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 32), torch.cat([torch.zeros(1, 9), torch.ones(1, 23)], 1)]).long()
    cfg = KVConfig.uniform("K4V2", 4, group_size=4, residual_length=4)
    cache = MixedPrecisionCache(cfg, tiny_mistral.config)
    out = generate(tiny_mistral, cache, {"input_ids": batch, "attention_mask": mask})
    for i, row in enumerate((long, short)):
        own = MixedPrecisionCache(cfg, tiny_mistral.config)
        alone = generate(tiny_mistral, own, {"input_ids": row})
        assert torch.equal(out.sequences[i, 32:], alone.sequences[0, row.shape[1]:])
        for got, want in zip(out.scores, alone.scores, strict=True):
            torch.testing.assert_close(got[i], want[0], rtol=0, atol=1e-4)
        for layer, reference in zip(cache.layers, own.layers):
            assert isinstance(layer, MixedPrecisionSlidingLayer)
            stored, expected = layer.rows[i], reference
            assert stored.first_token == expected.first_token > 0 and stored.get_seq_length() == expected.get_seq_length()
            for a, b in zip(stored.history.stored_tensors(), expected.history.stored_tensors(), strict=True):
                torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)


def test_nbytes_fp16_is_what_dynamic_cache_stores(tiny_gemma3):
    cache = MixedPrecisionCache(KVConfig.uniform("KV4", 4, group_size=4, residual_length=4), tiny_gemma3.config)
    reference = DynamicCache(config=tiny_gemma3.config)
    with torch.no_grad():
        for c in (cache, reference):
            tiny_gemma3(prompt(1, 40), **cache_kwargs(tiny_gemma3, c))
    fp16 = sum(layer.keys.numel() * 2 * 2 for layer in reference.layers)  # K and V at 2 bytes
    assert cache.nbytes_fp16() == fp16 == 2 * (7 + 40) * 16 * 2 * 2


def test_packed_attention_falls_back_for_softcap_and_sliding_layers():
    """Gemma 2 softcaps attention logits (eager attention): the packed kernel cannot, so those steps must run the
    model's own attention, never the kernel with the softcap dropped; sliding layers decode on the torch path."""
    from kvtuner.cache.attention import use_packed_attention

    model = _seeded(Gemma2ForCausalLM, Gemma2Config(**TINY, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=0.05,
                                                    attn_implementation="eager"))
    cfg = KVConfig.uniform("K4V4", 4, group_size=4, residual_length=4)
    x = {"input_ids": prompt(1, 21)}
    ref = generate(model, MixedPrecisionCache(cfg, model.config), x)
    cache = MixedPrecisionCache(cfg, model.config)
    with pytest.warns(UserWarning) as caught, use_packed_attention(model, cache, backend="torch"):
        out = generate(model, cache, x)
    messages = [str(w.message) for w in caught]
    assert any("2 sliding-window layer(s)" in m for m in messages)
    assert any("does not implement softcap" in m for m in messages)
    assert model.config._attn_implementation == "eager"
    assert_same(out, ref)  # the same attention on the same dequantized history (the kernel's would differ by ~1e-5)


def test_gemma3_pre_rope_keys_use_each_layer_types_rope_base(tiny_gemma3):
    """Gemma 3's sliding and full layers rotate with different bases (10k and 1M by default): pre-RoPE keys must
    un-rotate each layer with its own."""
    from kvtuner.cache.compat import rope_inv_freq

    config = tiny_gemma3.config
    dims = torch.arange(0, 16, 2).float() / 16
    for layer, kind in enumerate(config.layer_types):
        base = config.rope_parameters[kind]["rope_theta"]
        torch.testing.assert_close(rope_inv_freq(config, layer), 1.0 / base**dims)
    assert not torch.equal(rope_inv_freq(config, 0), rope_inv_freq(config, 1))
