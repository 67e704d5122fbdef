import json

import pytest
from typer.testing import CliRunner

from kvtuner import KVConfig
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
