import copy

import pytest
import torch

from kvtuner.config import KVConfig, LayerSpec
from kvtuner.evaluate import Evaluator
from kvtuner.profile import BlockwiseEvaluator, ProfileSettings, decode_faithful_attention, profile_layers
from kvtuner.method import KVMethod
from kvtuner.profile.blockwise import block_mask

G = 16  # tiny_llama has head_dim 16, so groups of 16


def test_block_mask_small():
    mask = block_mask(0, 5, history=4, window=2).int().tolist()
    history = [row[:4] for row in mask]
    own = [row[4:] for row in mask]
    assert history == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert own == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def dense_reference(q, k, v, spec, scaling):
    """Token by token: query t sees quantized keys of earlier windows, full-precision keys of its own."""
    kq, vq = KVMethod(spec).roundtrip(k, v)
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for t in range(q.shape[-2]):
        start = (t // spec.window) * spec.window
        keys = torch.cat([kq[..., :start, :], k[..., start : t + 1, :]], dim=-2).repeat_interleave(group, 1)
        values = torch.cat([vq[..., :start, :], v[..., start : t + 1, :]], dim=-2).repeat_interleave(group, 1)
        weights = torch.softmax((q[..., t : t + 1, :] @ keys.transpose(-1, -2)) * scaling, dim=-1)
        out[..., t : t + 1, :] = weights @ values
    return out


@pytest.mark.parametrize("spec", [
    LayerSpec("kivi", 4, 2, G, 32),
    LayerSpec("kivi", 2, 2, G, 64),
    LayerSpec("per_token", 4, 4, G, 0),
    LayerSpec("fp8", 8, 8, G, 16),
], ids=lambda s: f"{s.label}-r{s.residual_length}")
@pytest.mark.parametrize("length", [63, 300])
def test_attention_matches_token_by_token_reference(spec, length):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, h, length, 16, generator=g) for h in (4, 2, 2))
    got = decode_faithful_attention(q, k, v, KVMethod(spec), 0.25)
    torch.testing.assert_close(got, dense_reference(q, k, v, spec, 0.25), rtol=1e-5, atol=1e-5)


def ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def single_layer(num_layers: int, layer: int, spec: LayerSpec) -> KVConfig:
    return KVConfig([spec if i == layer else LayerSpec("fp16") for i in range(num_layers)])


def test_single_layer_profile_equals_evaluator(tiny_llama):
    """The profile's KL is Evaluator's KL for the same single-layer config (the decode-faithful number).

    In float64: the one-pass and the chunked paths add in different orders, and in float32 that alone
    moves a KL of 2e-5 by up to 1e-3 relative, and KV8's KLs (1e-9 to 2e-8) by their whole size, on some
    CPUs. In float64 they agree to ~1e-7 relative on the 2e-5 KLs and ~5e-14 absolute on KV8's (what is left
    is the float32 log-softmax both paths share)."""
    model = copy.deepcopy(tiny_llama).double()
    tokens = ids(160)
    settings = ProfileSettings(pairs=("KV8", "K4V2", "K2V2"), methods=("kivi", "per_token", "fp8"), group_size=G,
                               split_bits=None)
    profile = profile_layers(model, tokens, settings)
    evaluator = Evaluator(model, tokens)
    assert profile.loss.shape == (3, 7)  # 3 kivi + 3 per_token + fp8:KV8
    for layer in range(profile.num_layers):
        for c, spec in enumerate(profile.candidates):
            expected = evaluator.evaluate(single_layer(profile.num_layers, layer, spec)).kl
            assert profile.loss[layer, c] == pytest.approx(expected, rel=1e-5, abs=1e-12), (layer, spec.label)


def test_whole_config_kl_close_to_evaluator(tiny_llama):
    tokens = ids(128, seed=1)
    fast, reference = BlockwiseEvaluator(tiny_llama, tokens), Evaluator(tiny_llama, tokens)
    for pair in ("K4V2", "K2V2"):
        config = KVConfig.uniform(pair, 3, group_size=G)
        assert fast.kl(config) == pytest.approx(reference.evaluate(config).kl, rel=1e-3)


def test_model_is_left_as_found(tiny_llama):
    before = tiny_llama.config._attn_implementation
    BlockwiseEvaluator(tiny_llama, ids(64), capture=True).kl_single(1, LayerSpec("kivi", 2, 2, G, 32))
    assert tiny_llama.config._attn_implementation == before


@pytest.mark.slow
def test_default_model_profile_equals_evaluator(default_model, wikitext):
    from kvtuner.evaluate import token_windows

    model, tokenizer = default_model
    tokens = token_windows(wikitext, tokenizer, 128)
    fast, reference = BlockwiseEvaluator(model, tokens, capture=True), Evaluator(model, tokens)
    for layer, spec in ((3, LayerSpec("kivi", 2, 2)), (29, LayerSpec("per_token", 4, 4))):
        expected = reference.evaluate(single_layer(30, layer, spec)).kl
        # float32 model: the two paths' summation orders alone differ by 1.5e-4 relative (see the float64 test above)
        assert fast.kl_single(layer, spec) == pytest.approx(expected, rel=1e-3)


def test_block_mask_sliding_window():
    """Window 2 blocks, sliding window 3: query t sees keys t-2..t, quantized before its block start."""
    mask = block_mask(4, 6, history=4, window=2, sliding_window=3, first=1).int().tolist()
    assert [row[:3] for row in mask] == [[0, 1, 1], [0, 0, 1]]  # history keys 1..3
    assert [row[3:] for row in mask] == [[1, 0], [1, 1]]  # own block keys 4..5


@pytest.mark.parametrize("spec", [LayerSpec("kivi", 4, 2, G, 32), LayerSpec("per_token", 4, 4, G, 0)],
                         ids=lambda s: s.method)
@pytest.mark.parametrize("sliding_window", [5, 40])
def test_sliding_attention_matches_token_by_token_reference(spec, sliding_window):
    g = torch.Generator().manual_seed(sliding_window)
    q, k, v = (torch.randn(1, h, 150, 16, generator=g) for h in (4, 2, 2))
    kq, vq = KVMethod(spec).roundtrip(k, v)
    want = torch.empty_like(q)
    for t in range(150):
        start, lo = (t // spec.window) * spec.window, max(t - sliding_window + 1, 0)
        keys = torch.cat([kq[..., lo:start, :], k[..., max(lo, start) : t + 1, :]], dim=-2).repeat_interleave(2, 1)
        values = torch.cat([vq[..., lo:start, :], v[..., max(lo, start) : t + 1, :]], dim=-2).repeat_interleave(2, 1)
        want[..., t : t + 1, :] = torch.softmax(q[..., t : t + 1, :] @ keys.transpose(-1, -2) * 0.25, dim=-1) @ values
    torch.testing.assert_close(decode_faithful_attention(q, k, v, KVMethod(spec), 0.25, sliding_window), want,
                               rtol=1e-5, atol=1e-5)


def hybrid_models():
    """Tiny Gemma 3 (sliding and full layers, q/k norms, one KV head, two RoPE bases) and Mistral (all sliding)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1)
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(**tiny, head_dim=16, sliding_window=40, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"]))
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**tiny, sliding_window=24))
    return {"gemma3": gemma.eval().double(), "mistral": mistral.eval().double()}


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_single_layer_profile_equals_evaluator_on_sliding_layers(name):
    """The one-pass profile on hybrid models (layers replayed through the model's own forward) is the chunked
    evaluator's KL with sliding layers quantized, 150 tokens against windows of 40 and 24 (float64, see above)."""
    model = hybrid_models()[name]
    tokens = ids(150)
    settings = ProfileSettings(pairs=("K4V2", "KV2+prerope"), group_size=8, residual_length=16, split_bits=None)
    profile = profile_layers(model, tokens, settings)
    evaluator = Evaluator(model, tokens)
    assert profile.layer_stats[0]["entropy"] > 0
    for layer in range(3):
        for c, spec in enumerate(profile.candidates):
            expected = evaluator.evaluate(single_layer(3, layer, spec)).kl
            assert profile.loss[layer, c] == pytest.approx(expected, rel=1e-5), (layer, spec.label)
    fast = BlockwiseEvaluator(model, tokens)
    config = KVConfig.uniform("K2V2", 3, group_size=8, residual_length=16)
    assert fast.kl(config) == pytest.approx(evaluator.evaluate(config).kl, rel=1e-5)


def test_attention_arguments_it_does_not_implement_are_refused():
    """Gemma 2 softcaps its attention logits: the profile must refuse rather than compute softmax without it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                           attn_logit_softcapping=50.0)).eval()
    with pytest.raises(NotImplementedError, match="Gemma2Attention calls attention with softcap"):
        BlockwiseEvaluator(model, ids(32))
