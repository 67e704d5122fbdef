import json

import pytest
from typer.testing import CliRunner

from kvtuner import KVConfig
from kvtuner.config import KVConfigError
from kvtuner.cli import app
from kvtuner.models import ModelNotFoundError, default_gguf_path

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def needs_default_model():
    try:
        default_gguf_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def test_wrong_layer_count_exits_nonzero_with_one_line(tmp_path, wikitext):
    cfg = KVConfig.uniform("K4V2", 3).save(tmp_path / "three.json")
    result = run("eval", "--data", wikitext, "--config", cfg)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: config has 3 layers but the model (llama) has 30"


@pytest.mark.parametrize("args,message", [
    (("--kv", "K5V2"), "error: unsupported k_bits=5 for method 'kivi'"),
    (("--kv", "K4V4", "--residual-length", "40"), "error: residual_length 40 is not a multiple of group_size 32"),
    (("--kv", "K4V4", "--method", "awq"), "error: unknown method 'awq'"),
    ((), "error: give --kv SHORTHAND or --config FILE"),
])
def test_bad_flags(wikitext, args, message):
    result = run("eval", "--data", wikitext, *args)
    assert result.exit_code == 2 and result.stderr.startswith(message)


def test_malformed_config_and_missing_data(tmp_path, wikitext):
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": [')
    result = run("eval", "--data", wikitext, "--config", bad)
    assert result.exit_code == 2 and "not valid JSON" in result.stderr and "Traceback" not in result.output
    result = run("eval", "--data", tmp_path / "nothing.txt", "--kv", "KV8")
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tmp_path / 'nothing.txt'}: no such data file"


@pytest.mark.slow
def test_eval_json_reports_quality_and_real_bytes(wikitext):
    result = run("eval", "--data", wikitext, "--max-tokens", 64, "--kv", "K4V2", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"ppl", "kl", "top1", "avg_bits", "kv_bytes", "kv_bytes_fp16", "tokens", "effective_bits"} <= set(row)
    assert row["tokens"] == 64 and row["avg_bits"] == 3.0 and row["kv_bytes"] < row["kv_bytes_fp16"]


def test_layer_types_are_checked_in_one_line_before_any_weights_load(tmp_path, wikitext):
    """Given only a config: quantizing a hybrid model's sliding layers passes validation (the next error is the
    missing weights); a layer type kvtuner does not quantize (Llama 4's chunked attention) is refused by type."""
    from transformers import Gemma3TextConfig, Llama4TextConfig

    Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, sliding_window=8).save_pretrained(tmp_path / "gemma")
    Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, attention_chunk_size=8).save_pretrained(tmp_path / "llama4")
    for layers in ([], ["--layers", "full"]):
        result = run("eval", "--data", wikitext, "--model", tmp_path / "gemma", "--kv", "K4V4", "--group-size", "16",
                     "--residual-length", "16", *layers)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("error: cannot load model")
    result = run("eval", "--data", wikitext, "--model", tmp_path / "llama4", "--kv", "K4V4", "--group-size", "16",
                 "--residual-length", "16")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: layer 0 is a 'chunked_attention' layer; kvtuner quantizes only full-attention and sliding-window "
        "layers (give layer 0 an fp16 spec to keep it unquantized; the CLI's --layers full does that for a --kv shorthand)"]


def test_layers_full_keeps_sliding_layers_fp16_and_refuses_what_it_cannot_do(tmp_path):
    from transformers import Gemma3TextConfig, MistralConfig

    from kvtuner.cli import resolve_configs

    Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, sliding_window=8).save_pretrained(tmp_path / "gemma")
    [cfg] = resolve_configs(str(tmp_path / "gemma"), ["K4V4"], None, "kivi", 16, 16, layers="full")
    assert [spec.label for spec in cfg.layers] == ["fp16"] * 5 + ["KV4"]
    assert cfg.avg_bits == (5 * 16 + 4) / 6 and cfg.name == "K4V4 (full-attention layers)"
    MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=16).save_pretrained(tmp_path / "mistral")  # every layer sliding
    with pytest.raises(KVConfigError, match="no full-attention layer"):
        resolve_configs(str(tmp_path / "mistral"), ["K4V4"], None, "kivi", 16, 16, layers="full")
    with pytest.raises(KVConfigError, match="applies to --kv shorthands"):
        resolve_configs(str(tmp_path / "gemma"), None, [KVConfig.uniform("fp16", 6).save(tmp_path / "c.json")],
                        "kivi", 16, 16, layers="full")


def test_longctx_bad_lengths_and_depths_are_one_line(wikitext):
    result = run("longctx", "--filler", wikitext, "--kv", "K4V4", "--lengths", "2k,lots")
    assert result.exit_code == 2 and result.stderr.startswith("error: --lengths and --depths take comma-separated")
    result = run("longctx", "--filler", wikitext, "--kv", "K4V4", "--depths", "0,150")
    assert result.exit_code == 2 and result.stderr.strip() == "error: --depths are percentages from 0 to 100"


def test_longctx_writes_its_table_after_every_prompt(tiny_model_dir, wikitext, tmp_path):
    """The tiny model (one token per character): --out holds the finished table, as --json prints it."""
    out = tmp_path / "passkey.json"
    result = run("longctx", "--model", tiny_model_dir, "--filler", wikitext, "--kv", "K2V2", "--group-size", 16,
                 "--lengths", "400,500", "--depths", "0,100", "--trials", 2, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    saved, printed = json.loads(out.read_text()), json.loads(result.stdout)
    assert (saved["done"], saved["total"]) == (8, 8) and saved["results"] == printed
    assert [r["config"] for r in printed] == ["fp16 (DynamicCache)", "K2V2"]
    assert printed[1]["prompts"] == [[2, 2], [2, 2]] and len(printed[1]["answers"]) == 8
    assert all(s <= m for row_s, row_m in zip(printed[1]["same_answer_where_reference_misses"],
                                              printed[1]["reference_misses"]) for s, m in zip(row_s, row_m))


def test_longctx_resume_answers_only_the_prompts_a_partial_run_left(tiny_model_dir, wikitext, tmp_path):
    """A run cut after 3 of 8 prompts, resumed, gives the table of an uninterrupted run; other flags are refused."""
    args = ["longctx", "--model", tiny_model_dir, "--filler", wikitext, "--kv", "K2V2", "--group-size", 16,
            "--lengths", "400,500", "--depths", "0,100", "--trials", 2, "--json"]
    whole = json.loads(run(*args).stdout)
    out = tmp_path / "passkey.json"
    partial = {"done": 3, "total": 8, "trials": 2, "seed": 0, "seconds": 1.0,
               "results": [r | {k: r[k][:3] for k in ("keys", "answers", "cells")} for r in whole]}
    out.write_text(json.dumps(partial))
    result = run(*args, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == whole == json.loads(out.read_text())["results"]
    assert run(*args[:-2], 3, "--out", out, "--resume").stderr.startswith(f"error: {out} was saved with --trials 2")
    wrong = partial | {"results": [r | {"keys": ["99999"] * 3} for r in partial["results"]]}
    out.write_text(json.dumps(wrong))
    assert "answered other prompts" in run(*args, "--out", out, "--resume").stderr


def test_longctx_resume_refuses_a_file_it_did_not_write(tiny_model_dir, wikitext, tmp_path):
    """A truncated or foreign --out file is one line and exit 2, before the model loads, and is left as it is."""
    out = tmp_path / "passkey.json"
    for text in ("{\"done\": 3, \"res", "[1, 2]"):
        out.write_text(text)
        result = run("longctx", "--model", tiny_model_dir, "--filler", wikitext, "--kv", "K2V2", "--lengths", "400",
                     "--out", out, "--resume")
        assert result.exit_code == 2 and result.stderr.startswith(f"error: {out} is not a run kvtuner longctx saved")
        assert len(result.stderr.strip().splitlines()) == 1 and out.read_text() == text
