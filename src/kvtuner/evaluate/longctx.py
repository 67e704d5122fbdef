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

One prefill for every config (:func:`prefill`): a prompt's prefill is one forward call, and a kvtuner
cache lets that call attend to its own tokens in full precision before it flushes (see
:mod:`kvtuner.cache.layer`). So the prefill's logits are the same for every config, and a config's cache
after it is a function of the K/V the model handed to ``cache.update`` and of that call's arguments
alone. :func:`prefill` runs the model once with a ``DynamicCache`` that records every ``update`` call;
:meth:`Prefill.cache` builds a config's cache by making the same calls, with the same arguments, in the
same order. The cache that results is bit for bit the one a direct prefill builds, and so are the
answers (``tests/evaluate/test_longctx.py`` checks cache bytes, logits and tokens for plain KIVI,
sink + pre-RoPE and calibrated codebook / outlier / kvquant layers). On a long prompt the prefill is most
of the cost: at 8k tokens on one CPU thread about 55 s, the eight answer tokens a few seconds.

Two disjoint splits, so a search can calibrate on retrieval without tuning to the prompts it is
judged on (``kvtuner search --objective longctx``): ``evaluation`` prompts take even keys and their
filler from the first three quarters of the filler's tokens, ``calibration`` prompts odd keys and the
last quarter. Whatever the seeds, lengths and depths, the two never share a key or a filler token.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtuner.cache import MixedPrecisionCache, cache_kwargs
from kvtuner.cache.compat import Cache, DynamicCache, RecordingCache
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
    """Keys retrieved per (length, depth) cell of one config, and the answer to every prompt answered so far.

    ``answers``, ``keys`` and ``cells`` follow the prompts in order; ``counts`` is ``trials`` in every cell once a
    run is complete (less in a partial result)."""

    config: str
    lengths: list[int]
    depths: list[float]
    hits: list[list[int]] = field(default_factory=list)  # [len(lengths)][len(depths)]
    counts: list[list[int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    cells: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        self.hits = self.hits or [[0] * len(self.depths) for _ in self.lengths]
        self.counts = self.counts or [[0] * len(self.depths) for _ in self.lengths]

    def add(self, cell: tuple[int, int], key: str, text: str) -> None:
        i, j = cell
        self.hits[i][j] += key in text
        self.counts[i][j] += 1
        self.answers.append(text)
        self.keys.append(key)
        self.cells.append(cell)

    @property
    def accuracy(self) -> list[list[float]]:
        """Share of each cell's prompts whose key the answer holds (NaN for a cell with no prompt yet)."""
        return [[h / c if c else math.nan for h, c in zip(hit, count)] for hit, count in zip(self.hits, self.counts)]

    def agreement(self, reference: "RetrievalResult") -> tuple[list[list[int]], list[list[int]]]:
        """On the prompts whose key ``reference`` (the full-precision cache) misses: per cell, how many of them this
        config answers with exactly the reference's text (all ``ANSWER_TOKENS`` tokens: an answer stops early only
        once it holds the key), and how many there are. A 135M model that misses a key mostly answers with prose
        ("a very fine piece of furniture"), not a wrong number, so the whole text is what is compared."""
        same = [[0] * len(self.depths) for _ in self.lengths]
        misses = [[0] * len(self.depths) for _ in self.lengths]
        for (i, j), key, ours, theirs in zip(self.cells, self.keys, self.answers, reference.answers):
            if key not in theirs:
                misses[i][j] += 1
                same[i][j] += ours == theirs
        return same, misses

    def to_json(self, reference: "RetrievalResult | None" = None) -> dict:
        out = {"config": self.config, "lengths": self.lengths, "depths": self.depths,
               "accuracy": [[None if math.isnan(a) else a for a in row] for row in self.accuracy],
               "hits": self.hits, "prompts": self.counts}
        if reference is not None:
            same, misses = self.agreement(reference)
            out["reference_misses"], out["same_answer_where_reference_misses"] = misses, same
        return out | {"keys": self.keys, "answers": self.answers, "cells": self.cells}

    @classmethod
    def from_json(cls, data: dict) -> "RetrievalResult":
        """A result as :meth:`to_json` wrote it (its prompts' keys, answers and cells; counts follow from them)."""
        result = cls(data["config"], data["lengths"], data["depths"])
        for cell, key, text in zip(data["cells"], data["keys"], data["answers"]):
            result.add(tuple(cell), key, text)
        return result


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


@dataclass
class Prefill:
    """A prompt's prefill through a full-precision cache, recorded: the last position's logits ``[1, 1, V]`` and
    every ``cache.update`` call the model made, in order (layer index, key and value states, further arguments)."""

    logits: torch.Tensor
    updates: list[tuple[int, torch.Tensor, torch.Tensor, tuple, dict]]

    def cache(self, model: PreTrainedModel, config: KVConfig | None) -> Cache:
        """``config``'s cache (None: ``DynamicCache``) as the model's prefill of this prompt leaves it: the recorded
        ``update`` calls, made again on a fresh cache."""
        cache = new_cache(model, config)
        self.replay(cache)
        return cache

    def replay(self, cache: Cache) -> None:
        for layer_idx, key_states, value_states, args, kwargs in self.updates:
            cache.update(key_states, value_states, layer_idx, *args, **kwargs)


def new_cache(model: PreTrainedModel, config: KVConfig | None) -> Cache:
    """An empty cache for ``config`` (None: transformers' ``DynamicCache``, full precision)."""
    return DynamicCache(config=model.config) if config is None else MixedPrecisionCache(config, model.config)


@torch.no_grad()
def prefill(model: PreTrainedModel, prompt: PasskeyPrompt) -> Prefill:
    """Prefill ``prompt`` once, in one forward call, recording what every config's cache needs (see the module
    docstring)."""
    cache = RecordingCache(config=model.config)
    logits = model(prompt.input_ids.to(model.device), use_cache=True, logits_to_keep=1,
                   **cache_kwargs(model, cache)).logits
    return Prefill(logits, cache.updates)


@torch.no_grad()
def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: PasskeyPrompt,
           config: KVConfig | None, prefilled: Prefill | None = None) -> str:
    """Greedy answer to ``prompt`` with ``config``'s cache (None: transformers' DynamicCache, full precision).

    prefilled: the prompt's recorded prefill (:func:`prefill`), to build the cache from instead of running the
    model over the prompt again; the answer is the same. Generation stops after ``ANSWER_TOKENS`` tokens, or as
    soon as the answer holds the key (no later token can take it out again, so the score is the same)."""
    cache = new_cache(model, config)
    kwargs = cache_kwargs(model, cache)
    tokens = []
    with use_packed_attention(model, cache):
        if prefilled is None:
            logits = model(prompt.input_ids.to(model.device), use_cache=True, logits_to_keep=1, **kwargs).logits
        else:
            prefilled.replay(cache)
            logits = prefilled.logits
        for step in range(ANSWER_TOKENS):
            tokens.append(logits[:, -1:].argmax(-1))
            text = tokenizer.decode(torch.cat(tokens, dim=1)[0], skip_special_tokens=True)
            if prompt.key in text or step + 1 == ANSWER_TOKENS:
                return text
            logits = model(tokens[-1], use_cache=True, **kwargs).logits


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
    shared_prefill: bool = True,
    on_prompt: Callable[[list[RetrievalResult], int, int], None] | None = None,
    resume: Sequence[RetrievalResult] = (),
) -> list[RetrievalResult]:
    """Passkey accuracy of every config (None: full precision) on the same evaluation-split prompts: ``trials`` per
    (length, depth).

    A key counts as retrieved when its digits appear in the answer. Order: shortest length first, and within a
    length trial by trial over the depths, so that a partial result covers every depth of the lengths it reached.
    shared_prefill: prefill each prompt once for all configs (:func:`prefill`; the same answers as prefilling it
    through each config's cache, which ``shared_prefill=False`` does). on_prompt(results, done, total): called after
    each prompt, e.g. to save a partial table. resume: a partial result of the same run (same configs, grid, trials
    and seed), whose prompts are not answered again."""
    results = [RetrievalResult("fp16 (DynamicCache)" if c is None else c.name or "config", list(lengths), list(depths))
               for c in configs]
    prompts = passkey_prompts(tokenizer, filler, lengths, depths, trials, seed)
    order = [((i, j), prompts[(i * len(depths) + j) * trials + trial])
             for i in range(len(lengths)) for trial in range(trials) for j in range(len(depths))]
    done = _resumed(results, resume, order)
    bar = tqdm(total=len(prompts) * len(configs), initial=done * len(configs), desc="passkey", unit="answer",
               disable=not progress)
    for n, (cell, prompt) in enumerate(order[done:], start=done):
        bar.set_postfix(tokens=prompt.length, depth=f"{prompt.depth:.0%}", refresh=False)
        prefilled = prefill(model, prompt) if shared_prefill else None
        for result, config in zip(results, configs):
            result.add(cell, prompt.key, answer(model, tokenizer, prompt, config, prefilled))
            bar.update()
        del prefilled
        if on_prompt is not None:
            on_prompt(results, n + 1, len(prompts))
    bar.close()
    return results


def _resumed(results: list[RetrievalResult], resume: Sequence[RetrievalResult],
             order: list[tuple[tuple[int, int], PasskeyPrompt]]) -> int:
    """Copy ``resume``'s answers into ``results`` after checking they answer the first prompts of ``order``; how many."""
    if not resume:
        return 0
    ours = [(r.config, r.lengths, r.depths) for r in results]
    theirs = [(r.config, r.lengths, r.depths) for r in resume]
    if ours != theirs:
        raise DataError(f"the saved run has other configs, lengths or depths: {theirs} (this run: {ours})")
    done = len(resume[0].answers)
    expected = [(cell, prompt.key) for cell, prompt in order[:done]]
    if done > len(order) or any(list(zip(r.cells, r.keys)) != expected for r in resume):
        raise DataError("the saved run answered other prompts (another seed, trial count or filler)")
    for result, old in zip(results, resume):
        for cell, key, text in zip(old.cells, old.keys, old.answers):
            result.add(cell, key, text)
    return done


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
    for k, (ax, result) in enumerate(zip(axes[0], results)):
        image = ax.imshow(result.accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths], fontsize=8)
        ax.set_yticks(range(len(result.lengths)), [str(n) for n in result.lengths] if k == 0 else [], fontsize=8)
        for i, row in enumerate(result.accuracy):
            for j, value in enumerate(row):
                ax.text(j, i, "–" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
        prompts = sorted({c for row in result.counts for c in row if c})  # a partial run: some cells have fewer
        ax.set_title(f"{result.config}\n({'–'.join(map(str, prompts[::max(len(prompts) - 1, 1)]))} prompts a cell)",
                     fontsize=9)
        ax.set_xlabel("depth of the key")
    axes[0][0].set_ylabel("prompt tokens")
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
