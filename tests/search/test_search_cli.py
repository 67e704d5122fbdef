import json

import pytest
import typer
from typer.testing import CliRunner

from kvtuner.config import KVConfig
from kvtuner.search.commands import calibrate_command, profile_command, search_command

app = typer.Typer()
app.command("calibrate")(calibrate_command)
app.command("profile")(profile_command)
app.command("search")(search_command)
runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.mark.parametrize("args,message", [
    (("search", "--budgets", "1.5"), "error: budget 1.5 bits is below the smallest pair KV2 (2 bits)"),
    (("search", "--budgets", "3,x"), "error: --budgets takes numbers separated by commas, not '3,x'"),
    (("search", "--pairs", "KV8,K5V2"), "error: unknown pair 'K5V2': unsupported k_bits=5"),
    (("profile", "--pairs", "K4V9"), "error: unknown pair 'K4V9'"),
    (("profile", "--methods", "awq"), "error: unknown method 'awq'"),
    (("search", "--sampler", "random"), "error: unknown sampler 'random'; use nsga2 or tpe"),
    (("search", "--objective", "gsm8k"), "error: --objective gsm8k needs --gsm8k-data"),
    (("search", "--objective", "longctx"), "error: --objective longctx needs --longctx-filler"),
    (("search", "--context", "8192"), "error: with --context, budgets are fractions of the fp16 KV bytes"),
])
def test_bad_arguments_fail_fast_with_one_line(args, message):
    result = run(*args, "--model", "no/such-model")  # flags are checked before any model is looked up
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_missing_and_empty_data(tmp_path):
    result = run("search", "--data", tmp_path / "none.txt", "--model", "no/such-model")
    assert result.exit_code == 2 and result.stderr == f"error: {tmp_path / 'none.txt'}: no such data file\n"
    (tmp_path / "empty.txt").write_text("  \n")
    result = run("profile", "--data", tmp_path / "empty.txt", "--model", "no/such-model")
    assert result.exit_code == 2 and result.stderr == f"error: {tmp_path / 'empty.txt'}: the data file is empty\n"


def test_profile_then_search_on_generated_text(tiny_model_dir, tmp_path):
    common = ("--model", tiny_model_dir, "--tokens", 64, "--group-size", 16, "--out", tmp_path)
    result = run("profile", *common, "--pairs", "KV8,K4V2,K2V2", "--json")
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)
    assert len(profile["loss"]) == 3 and len(profile["k_only"]) == 3
    assert (tmp_path / "calibration_generated.txt").stat().st_size > 0
    assert (tmp_path / "heatmap.png").is_file() and (tmp_path / "kv_split.png").is_file()

    result = run("search", *common, "--pairs", "KV8,K4V2,K2V2", "--groups", 2, "--trials", 6,
                 "--budgets", "3.0,4.0")
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.stdout and "best config per budget" in result.stdout
    assert KVConfig.load(tmp_path / "config_4.0.json").avg_bits <= 4.0
    # the profile was reused: same file, same data
    assert json.loads((tmp_path / "profile.json").read_text())["seconds"] == profile["seconds"]

    result = run("search", *common, "--pairs", "KV8,K4V2,K2V2", "--groups", 2, "--trials", 6)
    assert result.exit_code == 2 and "already exists" in result.stderr and "--resume" in result.stderr


def test_gsm8k_objective_runs(tiny_model_dir, tmp_path):
    problems = tmp_path / "gsm8k.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n"
                                for i in range(6)))
    result = run("search", "--model", tiny_model_dir, "--tokens", 64, "--group-size", 16, "--out", tmp_path,
                 "--pairs", "KV8,K2V2", "--split-bits", 0, "--groups", 1, "--trials", 2, "--budgets", "8",
                 "--objective", "gsm8k", "--gsm8k-data", problems, "--gsm8k-problems", 2,
                 "--gsm8k-max-new-tokens", 4, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert all(0.0 <= p["loss"] <= 1.0 for p in out["points"])  # error rates, not KL


def test_longctx_objective_runs_and_its_prompts_are_part_of_the_study(tiny_model_dir, tmp_path):
    filler = tmp_path / "filler.txt"
    filler.write_text(" ".join(f"Line {i} of a made-up story goes here." for i in range(200)))
    common = ("--model", tiny_model_dir, "--tokens", 64, "--group-size", 16, "--out", tmp_path, "--pairs", "KV8,K2V2",
              "--split-bits", 0, "--groups", 1, "--budgets", "8", "--objective", "longctx", "--longctx-filler", filler,
              "--longctx-lengths", "400", "--longctx-depths", "0,100")
    # --workers 2: a kvtuner worker process rebuilds the passkey prompts from the job stored in the study
    result = run("search", *common, "--trials", 2, "--longctx-trials", 1, "--workers", 2, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert all(p["loss"] in (0.0, 0.5, 1.0) for p in out["points"])  # error rates over 2 prompts
    result = run("search", *common, "--trials", 3, "--longctx-trials", 2, "--resume")
    assert result.exit_code == 2 and "differs in: longctx" in result.stderr
    result = run("search", *common, "--trials", 3, "--longctx-trials", 1, "--context", 4096, "--budgets", "1", "--resume")
    assert result.exit_code == 2 and "differs in: context" in result.stderr


def test_candidates_are_checked_against_model_and_calibration_before_weights_load(tiny_model_dir, tiny_llama, tmp_path):
    """A tiny Llama folder: its config loads in a moment, and every refusal comes before its weights do."""
    from kvtuner.method import Calibration
    from kvtuner.cache import fingerprint

    model = str(tiny_model_dir)
    result = run("profile", "--model", model, "--pairs", "KV4,KV3+nuq", "--group-size", 16)
    assert result.exit_code == 2
    assert result.stderr == "error: candidate KV3+nuq needs --calibration FILE (kvtuner calibrate writes one)\n"
    other = Calibration(fingerprint(tiny_llama.config).__class__("llama", 4, 2, 16))
    other.save(tmp_path / "other.json")
    result = run("search", "--model", model, "--pairs", "KV3+nuq", "--group-size", 16, "--calibration",
                 tmp_path / "other.json")
    assert result.exit_code == 2 and "was fitted for" in result.stderr and result.stderr.count("\n") == 1
    result = run("calibrate", "--model", model, "--pairs", "KV4,K2V4", "--group-size", 16)
    assert result.exit_code == 2 and result.stderr.startswith("error: nothing to calibrate in 'KV4,K2V4'")
    result = run("calibrate", "--model", model, "--pairs", "KV4+nuq")  # group 32 does not divide head_dim 16
    assert result.exit_code == 2 and "group_size 32 does not divide head_dim 16" in result.stderr


def test_a_model_the_profile_does_not_model_is_refused_in_one_line(tiny_model_dir, tmp_path):
    """Gemma 2 softcaps its attention logits, which the one-pass profile does not implement."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                   attn_logit_softcapping=50.0)).save_pretrained(tmp_path / "gemma2")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "gemma2")  # one token per character
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = run("profile", "--model", tmp_path / "gemma2", "--data", tmp_path / "text.txt", "--tokens", 64,
                 "--group-size", 16, "--pairs", "KV4", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.stderr  # after the weights' progress bars: one line
    assert result.stderr.strip().splitlines()[-1].startswith("error: Gemma2Attention calls attention with softcap")
