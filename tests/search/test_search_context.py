"""``--context N``: every layer priced by the bytes it stores at N tokens, budgets in fp16 bytes at N.

A hybrid model's sliding layers keep only their window, so at a long context they are cheap and its full
layers dear; the prices must be what the cache really stores, and the picks must respect the byte budget.
"""

import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from kvtuner.cache import MixedPrecisionCache, cache_kwargs
from kvtuner.config import KVConfig
from kvtuner.profile import ProfileSettings, profile_layers
from kvtuner.search import SearchError, SearchSettings, run_search
from kvtuner.search.pipeline import candidate_bytes, fp16_bytes_at, stored_bytes

G, WINDOW, CONTEXT = 16, 40, 256
PAIRS = ("KV8", "K4V4", "K4V2", "K2V2")


@pytest.fixture(scope="module")
def tiny_gemma3():
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gemma_profile(tiny_gemma3):
    torch.set_num_threads(1)
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    return ids, profile_layers(tiny_gemma3, ids, ProfileSettings(pairs=PAIRS, group_size=G, split_bits=None))


@pytest.mark.parametrize("kv", ["K4V2", "KV8"])
def test_prices_at_a_context_are_what_the_cache_stores(tiny_gemma3, kv):
    """Context a multiple of the residual window (nothing left in full precision): the price of each layer is the
    bytes a MixedPrecisionCache holds in that layer after the model read CONTEXT tokens."""
    config = KVConfig.uniform(kv, 4, group_size=G)
    spec = config.layers[0]
    per_layer_at_96 = candidate_bytes(spec, __import__("kvtuner").cache.fingerprint(tiny_gemma3.config), 96, torch.float32)
    prices = stored_bytes([spec], np.array([per_layer_at_96]), tiny_gemma3.config, 96, CONTEXT)[:, 0]
    cache = MixedPrecisionCache(config, tiny_gemma3.config)
    with torch.no_grad():
        tiny_gemma3(torch.randint(0, 128, (1, CONTEXT)), **cache_kwargs(tiny_gemma3, cache))
    assert prices.tolist() == [layer.nbytes() for layer in cache.layers]
    assert prices[0] < prices[1] / 4  # the sliding layer keeps 48 tokens (the window and a group), the full one 256
    assert fp16_bytes_at(tiny_gemma3.config, CONTEXT) == 2 * (39 + 256) * 16 * 2 * 2


def test_without_a_context_every_layer_is_priced_as_before(tiny_gemma3):
    nbytes = np.array([100, 200])
    assert stored_bytes([None, None], nbytes, tiny_gemma3.config, 96, None).tolist() == [[100, 200]] * 4


def test_byte_budget_search_on_a_hybrid_model(tiny_gemma3, gemma_profile, tmp_path):
    ids, profile = gemma_profile
    fp16 = fp16_bytes_at(tiny_gemma3.config, CONTEXT)
    settings = SearchSettings(trials=8, groups=None, population=4, budgets=(0.3, 0.45), context=CONTEXT)
    result = run_search(tiny_gemma3, profile, ids, None, settings, tmp_path)
    assert result.cost == {"context": CONTEXT, "tokens": CONTEXT, "kv_bytes_fp16": fp16, "budgets": "kv_fraction"}
    uniform = {p.name: p for p in result.uniform}
    kv8, k2v2 = uniform["uniform KV8"], uniform["uniform KV2"]
    assert kv8.kv_bytes > k2v2.kv_bytes and kv8.effective_bits == pytest.approx(16 * kv8.kv_bytes / fp16)
    for pick in result.budgets:
        assert pick.best.kv_bytes <= pick.budget * fp16 and pick.best.loss <= pick.additive.loss
        assert pick.uniform is None or pick.uniform.kv_bytes <= pick.budget * fp16
        saved = KVConfig.load(tmp_path / f"config_{pick.budget}.json")
        assert saved.meta["budget_kv_fraction"] == pick.budget and saved.meta["context"] == CONTEXT
        assert saved.meta["kv_bytes"] == pick.best.kv_bytes and saved.avg_bits == pytest.approx(pick.best.avg_bits)
    with pytest.raises(SearchError, match="below the cheapest config"):
        run_search(tiny_gemma3, profile, ids, None, SearchSettings(trials=2, budgets=(0.01,), context=CONTEXT),
                   tmp_path / "too_small")


@pytest.mark.parametrize("kw,message", [({"budgets": (3.0,)}, "fractions of the fp16 KV bytes"),
                                        ({"max_overhead_bits": 1.0}, "budgets are bytes already"),
                                        ({"context": 0}, "positive number of tokens")])
def test_bad_context_settings(kw, message):
    settings = SearchSettings(**{"budgets": (0.3,), "context": 1024, **kw})
    with pytest.raises(SearchError, match=message):
        settings.check(ProfileSettings(pairs=PAIRS, group_size=G).candidates())
