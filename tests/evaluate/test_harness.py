"""lm-evaluation-harness integration: the registered model against plain HFLM, decode-faithful scoring, the local
GSM8K task and both command lines. Runs on the tiny random-weight model with invented problems."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'kvtuner[lm-eval]' (make test installs it)")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from kvtuner.cache import MixedPrecisionCache, cache_kwargs  # noqa: E402
from kvtuner.config import KVConfig, KVConfigError  # noqa: E402
from kvtuner.evaluate.data import DataError  # noqa: E402
from kvtuner.evaluate.harness import TASKS_DIR, KVTunerLM, local_gsm8k  # noqa: E402
from kvtuner.models import load_model  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
DATA_DIR = Path(os.environ.get("KVTUNER_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
TINY = dict(group_size=16, residual_length=16)  # tiny_llama's head_dim is 16


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory):
    """Invented problems in GSM8K's jsonl format: 3 to score, 4 worked examples."""
    path = tmp_path_factory.mktemp("gsm8k")
    rows = [{"question": f"Kim has {n} red pens and {n + 2} blue pens. How many pens does she have?",
             "answer": f"She has {n} + {n + 2} = <<{n}+{n + 2}={2 * n + 2}>>{2 * n + 2} pens.\n#### {2 * n + 2}"}
            for n in range(1, 8)]
    for name, part in (("gsm8k_test.jsonl", rows[:3]), ("gsm8k_train.jsonl", rows[3:])):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return path


def evaluate(lm, data_dir, **kwargs):
    """simple_evaluate on gsm8k_local from ``data_dir``: (results, the logged samples of one answer filter)."""
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(data_dir)})
    result = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_local"], task_manager=manager, log_samples=True,
                                     gen_kwargs="max_gen_toks=24", **kwargs)
    return result, [s for s in result["samples"]["gsm8k_local"] if s["filter"] == "strict-match"]


def test_the_registry_name_resolves_to_the_kvtuner_model():
    assert lm_eval.api.registry.get_model("kvtuner") is KVTunerLM
    assert issubclass(KVTunerLM, HFLM)


def test_bad_model_args_fail_before_evaluation(tiny_model_dir, tmp_path):
    with pytest.raises(KVConfigError, match="exactly one of kv=SHORTHAND or kv_config=FILE"):
        KVTunerLM(pretrained=str(tiny_model_dir))
    with pytest.raises(KVConfigError, match="group"):  # head_dim 16 is not a multiple of the default group 32
        KVTunerLM(pretrained=str(tiny_model_dir), kv="K4V4")
    KVConfig.uniform("K4V4", 5, **TINY).save(tmp_path / "five.json")
    with pytest.raises(KVConfigError, match="5 layers"):
        KVTunerLM(pretrained=str(tiny_model_dir), kv_config=str(tmp_path / "five.json"))


def test_16_bit_specs_give_plain_hflm_generations_and_loglikelihoods(tiny, gsm8k_dir):
    model, tokenizer = tiny
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    ours = KVTunerLM(pretrained=model, tokenizer=tokenizer, kv="fp16", batch_size=1)
    responses = [[s["resps"] for s in evaluate(lm, gsm8k_dir, num_fewshot=2, limit=3)[1]] for lm in (plain, ours)]
    assert len(responses[0]) == 3 and responses[0] == responses[1]
    assert all(len(resp[0][0]) > 0 for resp in responses[0])

    requests = [Instance("loglikelihood", {}, (context, continuation), 0)
                for context in ("Question: Kim has 3 pens.\nAnswer:", "x" * 70)
                for continuation in (" 5", " She has 3 + 5 = 8 pens.\n#### 8")]
    for (a, greedy_a), (b, greedy_b) in zip(plain.loglikelihood(requests), ours.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_scoring_is_token_by_token_decoding_and_reads_the_quantized_cache(tiny):
    """Continuation scores equal a one-token-a-step decode through the K2V2 cache, from a prefill that ends off a
    window boundary, and differ from the full-precision forward pass (the cache is really read)."""
    model, tokenizer = tiny
    lm = KVTunerLM(pretrained=model, tokenizer=tokenizer, kv="K2V2", **TINY)
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    prefill = 37
    scored = lm._decode_logprobs(ids, prefill)

    cache = MixedPrecisionCache(lm.kv_config, model.config)
    with torch.no_grad():
        steps = [model(ids[:, :prefill], use_cache=True, **cache_kwargs(model, cache)).logits[0, -1:]]
        steps += [model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache)).logits[0]
                  for t in range(prefill, ids.shape[1])]
        full = model(ids).logits[0, prefill - 1 :]
    stepwise = torch.log_softmax(torch.cat(steps).float(), -1)
    assert scored.shape == (ids.shape[1] - prefill + 1, 128)
    torch.testing.assert_close(scored, stepwise, atol=1e-5, rtol=0)
    assert (scored[0] - torch.log_softmax(full[0], -1)).abs().max() < 1e-5  # the prefill attends in full precision
    assert (scored - torch.log_softmax(full, -1)).abs().max() > 1e-2


def test_a_quantized_generation_is_greedy_under_quantized_scoring(tiny):
    """What generate_until decodes through the K2V2 cache, the scoring path calls greedy token by token."""
    model, tokenizer = tiny
    lm = KVTunerLM(pretrained=model, tokenizer=tokenizer, kv="K2V2", **TINY)
    context = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    out = lm._model_generate(context, max_length=80, stop=[], do_sample=False)
    generated = out[0, 40:].tolist()
    assert len(generated) == 40
    [(logprob, greedy)] = lm._loglikelihood_tokens([(None, context[0].tolist(), generated)], disable_tqdm=True)
    assert greedy and logprob < 0
    plain = HFLM(pretrained=model, tokenizer=tokenizer)
    assert plain._model_generate(context, max_length=80, stop=[], do_sample=False)[0, 40:].tolist() != generated


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(tiny, monkeypatch):
    """lm-eval left-pads a batch (--batch_size above 1): the harness hands the cache the attention mask, so each row
    decodes as with batch size 1, even where transformers passes the cache no position_ids (before 5.18)."""
    import kvtuner.cache.layer as layer_module

    model, tokenizer = tiny
    lm = KVTunerLM(pretrained=model, tokenizer=tokenizer, kv="K2V2", **TINY)
    monkeypatch.setattr(layer_module, "position_ids_from", lambda args, kwargs: None)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (1, n), generator=g) for n in (23, 40, 31)]
    width = 40
    context = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0)) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in prompts])
    out = lm._model_generate(context, max_length=width + 30, stop=[], do_sample=False, attention_mask=mask,
                             min_new_tokens=30)
    for i, prompt in enumerate(prompts):
        n = prompt.shape[1]
        alone = lm._model_generate(prompt, max_length=n + 30, stop=[], do_sample=False, min_new_tokens=30)
        assert out[i, width:].tolist() == alone[0, n:].tolist()


def test_the_local_task_is_lm_evals_gsm8k_but_for_the_dataset():
    ours = load_yaml(TASKS_DIR / "gsm8k_local.yaml", resolve_func=False)
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml", resolve_func=False)
    dataset_keys = {"task", "tag", "dataset_path", "dataset_name", "custom_dataset"}
    assert {k: v for k, v in ours.items() if k not in dataset_keys} == \
        {k: v for k, v in theirs.items() if k not in dataset_keys}
    assert ours["task"] == "gsm8k_local"


def test_the_local_task_reads_the_local_files(tiny, gsm8k_dir):
    model, tokenizer = tiny
    lm = KVTunerLM(pretrained=model, tokenizer=tokenizer, kv="K4V4", **TINY)
    result, samples = evaluate(lm, gsm8k_dir, num_fewshot=2, limit=2)
    tests = [json.loads(line) for line in (gsm8k_dir / "gsm8k_test.jsonl").read_text().splitlines()]
    train = [json.loads(line)["question"] for line in (gsm8k_dir / "gsm8k_train.jsonl").read_text().splitlines()]
    assert [s["doc"] for s in samples] == tests[:2]
    prompt = samples[0]["arguments"][0][0]
    assert prompt.endswith(f"Question: {tests[0]['question']}\nAnswer:")
    assert sum(f"Question: {q}\nAnswer:" in prompt for q in train) == 2  # two shots from the train file
    assert result["n-shot"]["gsm8k_local"] == 2
    assert set(result["results"]["gsm8k_local"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}


def test_a_missing_data_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/gsm8k_train.jsonl: no such data file"):
        local_gsm8k(str(tmp_path))


def test_the_real_gsm8k_files_load():
    if not (DATA_DIR / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"GSM8K not found in {DATA_DIR} (set KVTUNER_DATA to the folder of shared/data)")
    data = local_gsm8k(str(DATA_DIR))
    lines = len((DATA_DIR / "gsm8k_test.jsonl").read_text().splitlines())
    assert data["test"].num_rows == lines and data["train"].num_rows > 0
    assert set(data["test"].column_names) >= {"question", "answer"}


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_both_command_lines_run_the_kvtuner_model(tiny_model_dir, gsm8k_dir):
    """``kvtuner lm-eval`` by task name; the plain ``lm_eval`` command with the task file's path."""
    common = ["--model", "kvtuner", "--model_args", f"pretrained={tiny_model_dir},kv=K4V4,group_size=16,residual_length=16",
              "--metadata", json.dumps({"data_dir": str(gsm8k_dir)}), "--limit", "1", "--num_fewshot", "1",
              "--gen_kwargs", "max_gen_toks=4", "--device", "cpu"]
    for args in (["-c", "from kvtuner.cli import app; app()", "lm-eval", *common, "--tasks", "gsm8k_local"],
                 ["-m", "lm_eval", *common, "--tasks", str(TASKS_DIR / "gsm8k_local.yaml")]):
        result = cli(*args)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "kvtuner ({'pretrained'" in result.stdout and "|gsm8k_local|" in result.stdout


def test_kvtuner_lm_eval_reports_a_bad_kv_in_one_line(tiny_model_dir, gsm8k_dir):
    result = cli("-c", "from kvtuner.cli import app; app()", "lm-eval", "--model", "kvtuner", "--model_args",
                 f"pretrained={tiny_model_dir},kv=K9V9", "--metadata", json.dumps({"data_dir": str(gsm8k_dir)}),
                 "--tasks", "gsm8k_local", "--limit", "1", "--device", "cpu")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: unsupported k_bits=9")
