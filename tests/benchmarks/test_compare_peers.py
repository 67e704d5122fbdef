"""The peer comparison's own logic: bits accounting, metrics, the front, the verdict and atomic outputs."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peers import hf_caches, llamacpp
from peers.common import Report, Row, Scores, pareto_front, verdict


def row(engine, config, bits, kl, nominal=None):
    return Row(engine, config, nominal if nominal is not None else bits, bits, 10.0, kl, 0.9, 64)


@pytest.mark.parametrize("name, bits", [("f16", 16), ("q8_0", 8.5), ("q5_1", 6), ("q5_0", 5.5), ("q4_1", 5),
                                        ("q4_0", 4.5), ("iq4_nl", 4.5)])
def test_ggml_effective_bits_from_block_sizes(name, bits):
    assert llamacpp.effective_bits(name) == bits


def test_llamacpp_ubatch_policy():
    runner = llamacpp.LlamaCppRunner("model.gguf", window=1024)
    assert runner.ubatch_for("f32", "f32") == 1 and runner.ubatch_for("f16", "f16") == 1
    assert runner.ubatch_for("q8_0", "q4_0") == 1024
    assert llamacpp.LlamaCppRunner("m.gguf", window=64, ubatch=512).ubatch_for("q4_0", "q4_0") == 64


def test_stored_bytes_counts_floats_at_two_bytes():
    codes = torch.zeros(10, dtype=torch.uint8)
    scale = torch.zeros(4, dtype=torch.float32)
    fp8 = torch.zeros(6, dtype=torch.float8_e4m3fn)
    meta = {"scale": scale, "zero": scale.half(), "shape": torch.Size([2, 5]), "nbits": 4}
    assert hf_caches.stored_bytes((codes, meta)) == 10 + 8 + 8
    assert hf_caches.stored_bytes([fp8, None]) == 6


def test_scores_identity_and_perplexity():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(8, 5), -1)
    ids = torch.randint(0, 5, (8,))
    s = Scores()
    s.add(logprobs, logprobs, ids)
    r = s.row("e", "c", 4, 4.5)
    assert r.kl == pytest.approx(0, abs=1e-12) and r.top1 == 1.0 and r.tokens == 8
    expected = math.exp(-float(logprobs[:-1].gather(-1, ids[1:, None]).mean()))
    assert r.ppl == pytest.approx(expected)


def test_pareto_front_and_verdict():
    rows = [row("kvtuner", "K2V2", 3.0, 0.1), row("kvtuner", "K4V4", 5.0, 0.003), row("kvtuner", "bad", 6.0, 0.01),
            row("kvtuner", "KV8", 9.0, 1e-5),
            row("llama.cpp", "q8_0", 8.5, 0.004), row("llama.cpp", "q4_0", 4.5, 0.03), row("llama.cpp", "f16", 16, 0.0),
            row("quanto", "KV2", 2.5, 0.5)]
    assert [r.config for r in pareto_front(rows[:4])] == ["K2V2", "K4V4", "KV8"]
    lines = verdict(rows)
    text = "\n".join(lines)
    assert "q8_0 (8.50 b, KL 4.00e-03): dominated" in text
    assert "q4_0 (4.50 b, KL 3.00e-02): NOT dominated" in text  # nothing of ours at <= 4.5 bits beats it
    assert "quanto KV2 (2.50 b, KL 5.00e-01): NOT dominated" in text  # we have no point that small
    assert "f16 is unquantized" in text
    assert lines[-1].startswith("best kvtuner at <= 4.0 nominal bits: K2V2")


def test_report_writes_all_files(tmp_path):
    report = Report(rows=[row("kvtuner", "K4V4", 5.0, 0.003), row("llama.cpp", "q4_0", 4.5, 0.03)],
                    reference_ppl={"transformers": 10.0}, notes=["a note"])
    written = report.write(tmp_path / "out", "title")
    assert sorted(p.name for p in written) == ["pareto.png", "run.json", "table.json", "table.md"]
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert table[0] == {"engine": "kvtuner", "config": "K4V4", "nominal_bits": 5.0, "effective_bits": 5.0,
                        "ppl": 10.0, "kl": 0.003, "top1": 0.9, "tokens": 64}
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="optimum-quanto is not installed")
def test_quanto_row_on_tiny_model():
    """Decode-faithful chunks on a tiny model: 4-bit groups of 32 with fp16 scale+shift are 5.0 effective bits."""
    from kvtuner.evaluate import Evaluator

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    evaluator = Evaluator(model, torch.randint(0, 128, (2, 96)))
    r = hf_caches.evaluate(evaluator, hf_caches.HFCacheSpec("quanto", 4))
    assert r.engine == "quanto" and r.tokens == 192
    assert r.effective_bits == pytest.approx(5.0)
    assert 0 <= r.kl < 0.05 and r.top1 > 0.8


def test_missing_peers_are_reported_not_raised(monkeypatch, tmp_path):
    from peers.common import PeerUnavailable

    monkeypatch.setitem(hf_caches.PACKAGES, "quanto", ("no_such_module_kvtuner", "optimum-quanto"))
    with pytest.raises(PeerUnavailable, match="optimum-quanto"):
        hf_caches.check_available("quanto")
    with pytest.raises(PeerUnavailable, match="gguf"):
        llamacpp.check_available(tmp_path / "model.safetensors")
