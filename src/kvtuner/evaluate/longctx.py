"""Long-context retrieval: a passkey hidden at a chosen depth of a long prompt, asked for at the end.

Why: quantization errors in the KV cache hide at long context. Perplexity on 2k tokens can stay
fine while a fact 7k tokens back is lost, and KIVI and KVQuant both report this kind of task.
Prompts are built here from a filler text (no download): a random 5-digit key sits in one
sentence placed at ``depth`` (0 = start, 1 = end of the filler) of a prompt of ``length`` tokens; the
model must repeat it. Every config sees the same prompts (one seed per length, depth and trial),
and the full-precision cache is scored on them too, so a config's loss is measured against what
the model itself can do.

Decode-faithful by construction: the prompt is prefilled through the config's cache and the
answer generated greedily from it, one token a step, inside ``use_packed_attention``.

Two disjoint splits, so a search can calibrate on retrieval without tuning to the prompts it is
judged on (``kvtuner search --objective longctx``): ``evaluation`` prompts take even keys and their
filler from the first three quarters of the filler's tokens, ``calibration`` prompts odd keys and the
last quarter. Whatever the seeds, lengths and depths, the two never share a key or a filler token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtuner.cache import MixedPrecisionCache, cache_kwargs
from kvtuner.cache.attention import use_packed_attention
from kvtuner.config import KVConfig
from kvtuner.evaluate.data import DataError

INSTRUCTION = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
ANSWER_TOKENS = 8
SPLITS = ("evaluation", "calibration")
CALIBRATION_SHARE = 4  # the last 1/4 of the filler's tokens is the calibration split's


def parse_length(text: str) -> int:
    """Prompt length in tokens: ``2048``, ``2k`` (= 2048) or ``8K``."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


@dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor  # [1, length]
    key: str
    length: int
    depth: float
    filler_span: tuple[int, int]  # [start, end) of the filler's tokens the prompt holds


@dataclass
class RetrievalResult:
    """Accuracy per (length, depth) cell of one config; ``answers`` the generated text of every prompt."""

    config: str
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]  # [len(lengths)][len(depths)]
    answers: list[str] = field(default_factory=list)


def split_range(filler_length: int, split: str) -> range:
    """The filler token positions ``split`` draws from: the first 3/4 for evaluation, the rest for calibration."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    cut = filler_length - filler_length // CALIBRATION_SHARE
    return range(0, cut) if split == "evaluation" else range(cut, filler_length)


def split_key(rng: random.Random, split: str) -> str:
    """A 5-digit key: even for evaluation, odd for calibration."""
    return str(10000 + 2 * rng.randrange(45000) + (split == "calibration"))


def passkey_prompt(tokenizer: PreTrainedTokenizerBase, filler: str | Sequence[int], length: int, depth: float,
                   seed: int, split: str = "evaluation") -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens: instruction, filler with the needle at ``depth``, question.

    ``filler``: text, or its token ids (tokenize a long text once for many prompts).
    The filler is read from a seed-chosen offset within ``split``'s part of ``filler`` (so trials differ in text
    as well as key); the needle goes in at the sentence end nearest ``depth`` of the filler part, if one is within
    5% of it."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], not {depth}")
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids if isinstance(filler, str) else filler
    part = split_range(len(filler_ids), split)
    rng = random.Random(seed)
    key = split_key(rng, split)
    head = tokenizer(INSTRUCTION, add_special_tokens=False).input_ids
    tail = tokenizer(QUESTION, add_special_tokens=False).input_ids
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
    budget = length - len(head) - len(tail) - len(needle)
    if budget <= 0 or len(part) < budget:
        raise DataError(f"a {length}-token prompt needs {max(budget, 0)} filler tokens; the {split} part of the "
                        f"filler has {len(part)} (of {len(filler_ids)})")
    start = rng.randrange(part.start, part.stop - budget + 1)
    body = filler_ids[start : start + budget]
    cut = round(depth * budget)
    ends = [i + 1 for i, t in enumerate(tokenizer.convert_ids_to_tokens(body)) if t.rstrip().endswith(".")]
    near = [e for e in ends if abs(e - cut) <= budget // 20]  # a sentence end within 5% of the depth, if any
    if near and 0 < cut < budget:
        cut = min(near, key=lambda e: abs(e - cut))
    ids = head + body[:cut] + needle + body[cut:] + tail
    return PasskeyPrompt(torch.tensor([ids]), key, length, depth, (start, start + budget))


def passkey_prompts(tokenizer: PreTrainedTokenizerBase, filler: str, lengths: Sequence[int], depths: Sequence[float],
                    trials: int, seed: int = 0, split: str = "evaluation") -> list[PasskeyPrompt]:
    """``trials`` prompts for every (length, depth), length-major; each prompt seeded by its cell and trial."""
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids
    return [passkey_prompt(tokenizer, filler_ids, length, depth, seed=hash((seed, length, j, trial)) % 2**31,
                           split=split)
            for length in lengths for j, depth in enumerate(depths) for trial in range(trials)]


@torch.no_grad()
def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: PasskeyPrompt,
           config: KVConfig | None) -> str:
    """Greedy answer to ``prompt`` with ``config``'s cache (None: transformers' DynamicCache, full precision)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if config is None else MixedPrecisionCache(config, model.config)
    kwargs = cache_kwargs(model, cache)
    tokens = []
    with use_packed_attention(model, cache):
        logits = model(prompt.input_ids.to(model.device), use_cache=True, logits_to_keep=1, **kwargs).logits
        for _ in range(ANSWER_TOKENS):
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
            logits = model(token, use_cache=True, **kwargs).logits
    return tokenizer.decode(torch.cat(tokens, dim=1)[0], skip_special_tokens=True)


def evaluate_retrieval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    configs: Sequence[KVConfig | None],
    filler: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    progress: bool = True,
) -> list[RetrievalResult]:
    """Passkey accuracy of every config (None: full precision) on the same evaluation-split prompts: ``trials`` per
    (length, depth).

    A key counts as retrieved when its digits appear in the answer."""
    results = [RetrievalResult("fp16 (DynamicCache)" if c is None else c.name or "config", list(lengths), list(depths),
                               [[0.0] * len(depths) for _ in lengths]) for c in configs]
    prompts = passkey_prompts(tokenizer, filler, lengths, depths, trials, seed)
    bar = tqdm(total=len(prompts) * len(configs), desc="passkey", unit="answer", disable=not progress)
    for n, prompt in enumerate(prompts):
        i, j = divmod(n // trials, len(depths))
        for result, config in zip(results, configs):
            text = answer(model, tokenizer, prompt, config)
            result.answers.append(text)
            result.accuracy[i][j] += (prompt.key in text) / trials
            bar.update()
    bar.close()
    return results


def retrieval_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[PasskeyPrompt],
                       config: KVConfig | None) -> float:
    """Share of ``prompts`` whose key ``config``'s cache retrieves (the search's ``longctx`` objective is 1 minus it)."""
    return sum(p.key in answer(model, tokenizer, p, config) for p in prompts) / len(prompts)


def retrieval_figure(results: Sequence[RetrievalResult], path: str | Path) -> Path:
    """One heatmap a config: context length (rows) x depth of the key (columns), colour = accuracy."""
    from kvtuner.profile.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(1.5 + 2.6 * len(results), 1.4 + 0.5 * len(results[0].lengths)),
                             squeeze=False)
    for ax, result in zip(axes[0], results):
        image = ax.imshow(result.accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths], fontsize=8)
        ax.set_yticks(range(len(result.lengths)), [str(n) for n in result.lengths], fontsize=8)
        for i, row in enumerate(result.accuracy):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(result.config, fontsize=9)
        ax.set_xlabel("depth of the key")
    axes[0][0].set_ylabel("prompt tokens")
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
