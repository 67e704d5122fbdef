import math

import pytest
import torch
from transformers import DynamicCache

from kvtuner import KVConfig, LayerSpec
from kvtuner.cache import cache_kwargs
from kvtuner.evaluate import Evaluator, decode_chunk_size, token_windows
from kvtuner.evaluate.data import DataError
from kvtuner.evaluate.metrics import kl_sum, nll_sum, top1_matches


def ids(batch=1, length=64, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_metrics_against_hand_computed_values():
    p = torch.tensor([[0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.25, 0.5, 0.25]]).log()
    assert kl_sum(p, q) == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    assert kl_sum(p, p) == 0
    assert top1_matches(p, q) == 0 and top1_matches(p, p) == 1
    assert nll_sum(q, torch.tensor([1])) == pytest.approx(math.log(2))


def test_16_bit_chunked_evaluation_equals_one_plain_forward(tiny_model):
    x = ids(2, 70)
    ev = Evaluator(tiny_model, x)
    with torch.no_grad():
        plain = tiny_model(x, use_cache=True, **cache_kwargs(tiny_model, DynamicCache())).logits
    r = ev.evaluate(KVConfig.uniform("fp16", 3), chunk_size=16)
    assert r.kl == pytest.approx(0, abs=1e-7) and r.top1 == 1.0
    logprobs = torch.log_softmax(plain.float(), -1)
    nll = nll_sum(logprobs[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
    assert r.ppl == pytest.approx(math.exp(nll / (2 * 69)), rel=1e-5)
    assert ev.reference_ppl() == pytest.approx(r.ppl, rel=1e-5)


def test_chunked_evaluation_is_decode_faithful(tiny_llama):
    """Chunks of the residual window give what token-by-token decoding gives."""
    x = ids(1, 48)
    cfg = KVConfig([LayerSpec("kivi", 2, 2, 8, 16)] * 3)
    ev = Evaluator(tiny_llama, x)
    assert decode_chunk_size(cfg, 48) == 16
    chunked, token_by_token = ev.evaluate(cfg), ev.evaluate(cfg, chunk_size=1)
    assert chunked.kl > 1e-6 and chunked.top1 < 1  # quantization did something
    # equal up to float noise (a code can flip where a value sits on a rounding boundary)
    assert chunked.kl == pytest.approx(token_by_token.kl, rel=1e-2)
    assert chunked.ppl == pytest.approx(token_by_token.ppl, rel=1e-5)
    whole_prompt = ev.evaluate(cfg, chunk_size=48)  # not faithful: every token would see full precision
    assert whole_prompt.kl == pytest.approx(0, abs=1e-9)


def test_layers_the_packed_path_reads_keep_no_full_precision_history(tiny_llama, monkeypatch):
    """KIVI layers are scored by the streaming chunk attention, never read back whole; a layer the packed path
    does not read (pre-RoPE keys) is read back (and kept) as before."""
    from kvtuner.cache.layer import MixedPrecisionLayer

    x = ids(1, 48)
    cfg = KVConfig([LayerSpec("kivi", 2, 2, 8, 16), LayerSpec("kivi", 4, 2, 8, 16, pre_rope=True),
                    LayerSpec("kivi", 4, 4, 8, 16)])
    ev = Evaluator(tiny_llama, x)
    read_back = []
    original = MixedPrecisionLayer.dequantized_history
    monkeypatch.setattr(MixedPrecisionLayer, "dequantized_history",
                        lambda self: read_back.append(self.spec.label) or original(self))
    ev.evaluate(cfg)
    assert read_back and set(read_back) == {"K4V2+prerope"}


def test_decode_chunk_size_is_gcd_of_windows():
    cfg = KVConfig([LayerSpec("kivi", 4, 4, 32, 64), LayerSpec("kivi", 2, 2, 32, 32), LayerSpec("fp16")])
    assert decode_chunk_size(cfg, 100) == 32
    assert decode_chunk_size(KVConfig([LayerSpec("per_token", 4, 4, 32, 0)]), 100) == 1
    assert decode_chunk_size(KVConfig.uniform("fp16", 2), 100) == 100


def test_token_windows_errors(tmp_path, default_model):
    _, tok = default_model
    with pytest.raises(DataError, match="no such data file"):
        token_windows(tmp_path / "missing.txt", tok, 16)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        token_windows(tmp_path / "empty.txt", tok, 16)
    (tmp_path / "short.txt").write_text("only a few words here")
    with pytest.raises(DataError, match="fewer than the 32 asked for"):
        token_windows(tmp_path / "short.txt", tok, 16, count=2)


def test_token_windows_are_disjoint(default_model, wikitext):
    _, tok = default_model
    both = token_windows(wikitext, tok, 64, count=2)
    second = token_windows(wikitext, tok, 64, skip_windows=1)
    assert torch.equal(both[1], second[0]) and not torch.equal(both[0], both[1])


@pytest.mark.slow
def test_default_model_quality_and_bytes(default_model, wikitext):
    model, tok = default_model
    ev = Evaluator(model, token_windows(wikitext, tok, 512))
    k8v4, k4v8, k4v4 = (ev.evaluate(KVConfig.uniform(kv, 30)) for kv in ("K8V4", "K4V8", "KV4"))
    assert k4v8.kl > 2 * k8v4.kl  # keys matter more than values
    assert k4v4.kv_bytes <= 0.33 * k4v4.kv_bytes_fp16
    assert 0.9 < k4v4.top1 < 1.0 and k4v4.avg_bits == 4.0 and k4v4.effective_bits == pytest.approx(5.0)
