"""GSM8K few-shot exact match with the cache under test (the task metric KVTuner reports).

Prompts are ``Question: ...\\nAnswer: ...`` with the worked answers of the first ``shots``
examples (calculator annotations ``<<...>>`` removed); generation is greedy and stops at the
next ``Question:``. The prediction is the number after ``####`` if the model writes one,
else the last number in its answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from kvtuner.cache import MixedPrecisionCache, cache_kwargs
from kvtuner.config import KVConfig
from kvtuner.evaluate.data import read_jsonl

_ANNOTATION = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class GSM8KResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[str | None]


def load_gsm8k(path: str | Path) -> list[dict[str, str]]:
    return read_jsonl(path, required=("question", "answer"))


def final_answer(answer: str) -> str | None:
    """The reference or predicted number, normalized (no commas, no trailing .0)."""
    tail = answer.split("####")[-1] if "####" in answer else answer
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in answer else numbers[-1]
    value = value.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def few_shot_prompt(shots: list[dict[str, str]], question: str) -> str:
    blocks = [f"Question: {s['question']}\nAnswer: {_ANNOTATION.sub('', s['answer'])}" for s in shots]
    return "\n\n".join([*blocks, f"Question: {question}\nAnswer:"])


class StopAfterText(StoppingCriteria):
    """Stop each row once its generated text contains ``text`` (transformers' ``stop_strings``
    precomputes over the whole vocabulary, which costs more than the generation here)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, text: str):
        self.tokenizer, self.prompt_length, self.text = tokenizer, prompt_length, text

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([self.text in t for t in tails], device=input_ids.device)


@torch.no_grad()
def evaluate_gsm8k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: KVConfig,
    examples: list[dict[str, str]],
    shots: list[dict[str, str]],
    max_new_tokens: int = 256,
    batch_size: int = 4,
    progress: bool = True,
) -> GSM8KResult:
    """Greedy few-shot accuracy on ``examples`` with a fresh ``MixedPrecisionCache`` per batch (left-padded: each
    row is stored and decoded as alone, so the batch size changes no answer beyond float noise)."""
    tokenizer.padding_side = "left"
    predictions: list[str | None] = []
    correct = 0
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="gsm8k", disable=not progress, unit="batch"):
        batch = examples[start : start + batch_size]
        prompts = [few_shot_prompt(shots, ex["question"]) for ex in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        cache = MixedPrecisionCache(config, model.config)
        cache.set_padding(enc.attention_mask)  # each left-padded row stored as alone, whatever the transformers version
        out = model.generate(
            **enc,
            **cache_kwargs(model, cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([StopAfterText(tokenizer, enc.input_ids.shape[1], "Question:")]),
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        for ex, text in zip(batch, texts):
            pred = final_answer(text.split("Question:")[0])
            predictions.append(pred)
            correct += pred is not None and pred == final_answer(ex["answer"])
    return GSM8KResult(correct / len(examples), correct, len(examples), predictions)
