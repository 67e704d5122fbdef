"""Passkey retrieval: prompt construction, the shared prefill, and the harness on the real default model."""

import math

import pytest
import torch

from kvtuner.cache import cache_kwargs
from kvtuner.cache.attention import use_packed_attention
from kvtuner.config import KVConfig, parse_label
from kvtuner.evaluate.data import DataError, read_text
from kvtuner.evaluate.longctx import (INSTRUCTION, NEEDLE, QUESTION, PasskeyPrompt, RetrievalResult, answer,
                                      evaluate_retrieval, new_cache, passkey_prompt, passkey_prompts, prefill,
                                      retrieval_figure)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="module")
def filler(wikitext):
    return read_text(wikitext)[:200_000]


def needle_at(tokenizer, prompt) -> int:
    """Token index where the needle starts."""
    needle = tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False).input_ids
    ids = prompt.input_ids[0].tolist()
    starts = [i for i in range(len(ids) - len(needle) + 1) if ids[i : i + len(needle)] == needle]
    assert len(starts) == 1
    return starts[0]


@pytest.mark.parametrize("length", [300, 1000])
def test_prompts_have_the_exact_length_and_the_key_at_its_depth(tokenizer, filler, length):
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        prompt = passkey_prompt(tokenizer, filler, length, depth, seed=7)
        assert prompt.input_ids.shape == (1, length)
        assert tokenizer.decode(prompt.input_ids[0]).count(prompt.key) == 2  # the needle says it twice
        positions.append(needle_at(tokenizer, prompt) / length)
    assert positions == sorted(positions) and positions[0] < 0.1 and positions[-1] > 0.85
    assert abs(positions[2] - 0.5) < 0.1  # moved at most 5% of the filler, to a sentence end
    other = passkey_prompt(tokenizer, filler, length, 0.5, seed=8)
    assert other.key != passkey_prompt(tokenizer, filler, length, 0.5, seed=7).key or \
        not torch.equal(other.input_ids, passkey_prompt(tokenizer, filler, length, 0.5, seed=7).input_ids)


def test_calibration_prompts_never_share_a_key_or_a_filler_token_with_evaluation_prompts(tokenizer, filler):
    """Same lengths, depths, trials and seed (the worst case): even keys against odd, and filler spans on either
    side of the split; each span is exactly the filler the prompt holds around its needle."""
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids
    head, tail = (len(tokenizer(t, add_special_tokens=False).input_ids) for t in (INSTRUCTION, QUESTION))
    grid = dict(lengths=[300, 1000], depths=[0.0, 0.5, 1.0], trials=8, seed=0)
    evaluation = passkey_prompts(tokenizer, filler, **grid)
    calibration = passkey_prompts(tokenizer, filler, **grid, split="calibration")
    assert len(evaluation) == len(calibration) == 48
    assert {p.key for p in evaluation}.isdisjoint(p.key for p in calibration)
    assert len({p.key for p in calibration}) > 40  # keys vary, they are not one constant
    assert max(p.filler_span[1] for p in evaluation) <= min(p.filler_span[0] for p in calibration)
    for prompt in evaluation[::7] + calibration[::7]:
        ids, at = prompt.input_ids[0].tolist(), needle_at(tokenizer, prompt)
        needle = len(tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False).input_ids)
        start, end = prompt.filler_span
        assert ids[head:at] + ids[at + needle : len(ids) - tail] == filler_ids[start:end]


def test_too_little_filler_and_bad_depths_are_refused(tokenizer):
    with pytest.raises(DataError, match="filler tokens"):
        passkey_prompt(tokenizer, "Too short. " * 5, 500, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, "x. " * 1000, 500, 1.5, seed=0)


def test_the_harness_is_decode_faithful_and_the_model_finds_short_keys(default_model, filler, tmp_path):
    """fp16 through our cache answers exactly as DynamicCache; the real model finds keys in 300 tokens."""
    model, tokenizer = default_model
    fp16, kv8 = KVConfig.uniform("fp16", 30), KVConfig.uniform("KV8", 30)
    results = evaluate_retrieval(model, tokenizer, [None, fp16, kv8], filler, [300], [0.0, 1.0], trials=2, progress=False)
    assert [r.config for r in results] == ["fp16 (DynamicCache)", "fp16", "KV8"]
    assert results[0].answers == results[1].answers
    assert results[0].accuracy == [[1.0, 1.0]]
    assert all(0 <= a <= 1 for r in results for row in r.accuracy for a in row)
    assert retrieval_figure(results, tmp_path / "passkey.png").stat().st_size > 1000


def cache_state(obj, path="cache", seen=None) -> dict:
    """Every tensor (as its raw bytes, dtype and shape) and plain value a cache holds, by attribute path; the code
    buffers' unused capacity (uninitialized memory, never read) and the layers' methods (built from the config) are
    left out."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return {path: (obj.dtype, tuple(obj.shape), obj.detach().contiguous().view(torch.uint8).flatten().tolist())}
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return {path: obj}
    if id(obj) in seen or callable(obj):
        return {}
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    else:
        items = ((k, v) for k, v in vars(obj).items() if k not in ("method", "_buffers"))
    state = {}
    for name, value in items:
        state.update(cache_state(value, f"{path}.{name}", seen))
    return state


def decode_logits(model, cache, logits, steps):
    """Greedy steps on ``cache`` inside ``use_packed_attention``, from the prefill's ``logits``: every step's logits."""
    out = [logits]
    with use_packed_attention(model, cache):
        for _ in range(steps):
            out.append(model(out[-1][:, -1:].argmax(-1), use_cache=True, **cache_kwargs(model, cache)).logits)
    return out


def assert_shared_prefill_is_direct_prefill(model, tokenizer, prompt, config, steps):
    """Cache bytes after the prefill, the prefill's logits, every decode step's logits and the cache after them,
    and ``answer``'s text: the same bits whether the cache is built from the recorded prefill or by the model."""
    recorded = prefill(model, prompt)
    direct = new_cache(model, config)
    with use_packed_attention(model, direct), torch.no_grad():
        logits = model(prompt.input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, direct)).logits
    replayed = recorded.cache(model, config)
    assert torch.equal(logits, recorded.logits)
    before = cache_state(direct)
    assert len(before) > 4 * model.config.num_hidden_layers and before == cache_state(replayed)
    with torch.no_grad():
        ours, theirs = decode_logits(model, replayed, recorded.logits, steps), decode_logits(model, direct, logits, steps)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert cache_state(direct) == cache_state(replayed)
    assert answer(model, tokenizer, prompt, config, recorded) == answer(model, tokenizer, prompt, config)


TINY_G = 16  # tiny_llama: head_dim 16
TINY_SPECS = ["K4V2", "K4V4+sink1+prerope", "KV3+sink1+prerope+nuq+ds2", "kvquant:KV2+sink1+prerope+nuq+ds2"]


@pytest.mark.parametrize("label", TINY_SPECS)
def test_a_cache_built_from_the_recorded_prefill_is_the_directly_prefilled_one_tiny(tiny_llama, tiny_model_dir,
                                                                                     one_thread, tmp_path, label):
    """Plain KIVI, sink + pre-RoPE, calibrated codebooks with outliers, kvquant; 75 prompt tokens: two residual
    windows flushed at the prefill, 11 tokens left, and a flush during the 30 decode steps."""
    from transformers import AutoTokenizer

    from kvtuner.profile.calibrate import calibrate

    spec = parse_label(label, group_size=TINY_G, residual_length=32)
    config = KVConfig([spec] * 3, name=label)
    if spec.codebook or spec.outliers or spec.method == "kvquant":
        windows = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
        config.calibration = str(calibrate(tiny_llama, windows, [spec]).save(tmp_path / "calibration.json"))
    ids = torch.randint(0, 128, (1, 75), generator=torch.Generator().manual_seed(1))
    prompt = PasskeyPrompt(ids, "12345", 75, 0.5, (0, 75))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # one token per character
    assert_shared_prefill_is_direct_prefill(tiny_llama, tokenizer, prompt, config, steps=30)


@pytest.mark.parametrize("kv", ["K4V2", "K2V2+sink1+prerope"])
def test_a_cache_built_from_the_recorded_prefill_is_the_directly_prefilled_one(default_model, filler, kv):
    """The real model (position_ids reach the cache, so pre-RoPE keys learn their offset from them), a 300-token
    passkey prompt, plain KIVI and sink + pre-RoPE."""
    model, tokenizer = default_model
    prompt = passkey_prompt(tokenizer, filler, 300, 0.5, seed=3)
    assert_shared_prefill_is_direct_prefill(model, tokenizer, prompt, KVConfig.uniform(kv, 30), steps=6)


def test_results_count_partial_cells_and_compare_answers_where_the_reference_misses():
    reference, config = (RetrievalResult(name, [2048, 4096], [0.0, 1.0]) for name in ("fp16", "K2V2"))
    for cell, key, ref_text, text in [((0, 0), "12344", " 12344.", " 12344"),           # both find it
                                      ((0, 1), "22222", " a fine piece", " a fine piece"),  # fp16 misses; same
                                      ((0, 1), "22222", " 2222.", " 2229."),            # fp16 misses; not the same
                                      ((0, 1), "22222", " the key", " the key"),        # fp16 misses; same
                                      ((1, 0), "44444", " 44444", " 4444")]:            # K2V2 loses it
        reference.add(cell, key, ref_text)
        config.add(cell, key, text)
    assert config.hits == [[1, 0], [0, 0]] and config.counts == [[1, 3], [1, 0]]
    assert config.accuracy[0] == [1.0, 0.0] and config.accuracy[1][0] == 0.0 and math.isnan(config.accuracy[1][1])
    assert config.agreement(reference) == ([[0, 2], [0, 0]], [[0, 3], [0, 0]])
    document = config.to_json(reference)
    assert document["accuracy"][1] == [0.0, None] and document["same_answer_where_reference_misses"][0] == [0, 2]
