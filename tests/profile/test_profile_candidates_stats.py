import math

import numpy as np
import pytest
import torch

from kvtuner.config import KVConfigError, LayerSpec, parse_shorthand
from kvtuner.profile import DEFAULT_PAIRS, Profile, candidate_specs
from kvtuner.method import KVMethod
from kvtuner.profile.stats import attention_concentration, channel_outlier_ratio, output_error


def test_default_candidates():
    specs = candidate_specs()
    assert [(s.k_bits, s.v_bits) for s in specs] == [parse_shorthand(p) for p in DEFAULT_PAIRS]
    assert all(s.method == "kivi" and s.group_size == 32 and s.residual_length == 32 for s in specs)


def test_methods_presets_and_qualified_pairs():
    specs = candidate_specs("KV8,K4V2,per_token:K8V4", "kivi,fp8")
    assert [s.label for s in specs] == ["KV8", "fp8:KV8", "K4V2", "per_token:K8V4"]
    assert len(candidate_specs("3bit")) == 14 and len(candidate_specs("all")) == 16
    assert candidate_specs("KV8,kv8") == candidate_specs("KV8")  # duplicates collapse


@pytest.mark.parametrize("pairs,methods,message", [
    ("K5V2", "kivi", "unknown pair 'K5V2'"),
    ("KX", "kivi", "unknown pair 'KX'"),
    ("KV4", "awq", "unknown method 'awq'"),
    ("fp8:K4V4", "kivi", "fp8 stores 8 bits"),
    ("fp16", "kivi", "unquantized"),
    ("K4V4", "fp8", "no candidate pairs"),
])
def test_bad_candidates(pairs, methods, message):
    with pytest.raises(KVConfigError, match=message):
        candidate_specs(pairs, methods)


def test_output_error_grows_as_bits_shrink():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 128, 32, generator=g) for h in (4, 2, 2))
    errors = [output_error(q, k, v, KVMethod(LayerSpec("kivi", b, b)), 32**-0.5) for b in (8, 4, 2)]
    assert 0 < errors[0] < errors[1] < errors[2] < 1


def test_concentration_of_uniform_attention():
    """Zero queries attend uniformly over the causal prefix: entropy is the mean of log(t + 1)."""
    length = 50
    q, k = torch.zeros(1, 2, length, 8), torch.randn(1, 1, length, 8)
    entropy, top = attention_concentration(q, k, 1.0)
    assert entropy == pytest.approx(np.mean([math.log(t + 1) for t in range(length)]), rel=1e-5)
    assert top == pytest.approx(np.mean([1 / (t + 1) for t in range(length)]), rel=1e-5)


def test_channel_outlier_ratio_finds_planted_channel():
    x = torch.ones(1, 2, 64, 16)
    assert channel_outlier_ratio(x) == pytest.approx(1.0)
    x[..., 5] = 20.0
    assert channel_outlier_ratio(x) == pytest.approx(20.0)


def test_profile_json_round_trip(tmp_path):
    specs = candidate_specs("KV8,K2V2")
    loss = np.array([[1e-5, 1e-2], [2e-5, 3e-3]])
    profile = Profile(specs, loss, loss * 10, [{"entropy": 1.0}] * 2, tokens=64, seconds=1.0, split_bits=2,
                      k_only=np.array([1e-3, 2e-3]), v_only=np.array([1e-4, 2e-4]), meta={"x": 1})
    back = Profile.load(profile.save(tmp_path / "p.json"))
    assert back.candidates == specs and back.meta == {"x": 1}
    np.testing.assert_array_equal(back.loss, loss)
    np.testing.assert_array_equal(back.k_only, profile.k_only)
    per_layer, overall = back.spearman()
    assert per_layer.tolist() == pytest.approx([1.0, 1.0]) and overall == pytest.approx(1.0)
