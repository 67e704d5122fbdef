"""Passkey retrieval: prompt construction, and the harness on the real default model."""

import pytest
import torch

from kvtuner.config import KVConfig
from kvtuner.evaluate.data import DataError, read_text
from kvtuner.evaluate.longctx import (INSTRUCTION, NEEDLE, QUESTION, evaluate_retrieval, passkey_prompt,
                                      passkey_prompts, retrieval_figure)


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
