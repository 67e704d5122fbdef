import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvtuner.quant.rope import rotate


def test_rotate_matches_transformers_apply_rotary_pos_emb():
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    torch.manual_seed(0)
    k = torch.randn(2, 2, 7, 32, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15]])
    cos, sin = rotary(k.float(), positions)
    _, expected = apply_rotary_pos_emb(k, k, cos.double(), sin.double())
    torch.testing.assert_close(rotate(k, positions, rotary.inv_freq), expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.sampled_from([8, 64, 128]), st.integers(0, 100_000))
def test_inverse_rotation_undoes_the_rotation(batch, tokens, dim, offset):
    torch.manual_seed(tokens)
    x = torch.randn(batch, 2, tokens, dim, dtype=torch.float64)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    positions = torch.arange(tokens)[None] + offset
    back = rotate(rotate(x, positions, inv_freq), positions, inv_freq, inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-9)
    assert rotate(x.float(), positions, inv_freq).dtype == torch.float32
