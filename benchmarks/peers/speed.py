"""CPU generation speed with a given transformers cache: greedy, one token per step, timed apart from prefill.

For context only: the caches here dequantize their whole history on every step in plain torch,
and the machine is shared, so the numbers say "how much slower on CPU", not a kernel's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvtuner.cache import cache_kwargs


@torch.no_grad()
def hf_generation_speed(model, prompt: torch.Tensor, make_cache: Callable[[], object], new_tokens: int,
                        engine: str, cache_name: str) -> dict:
    """Prefill ``prompt`` ([1, P]) into a fresh cache, then time ``new_tokens`` greedy decode steps."""
    cache = make_cache()
    kwargs = cache_kwargs(model, cache)
    t0 = time.perf_counter()
    logits = model(prompt, use_cache=True, **kwargs).logits
    t1 = time.perf_counter()
    token = logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        token = model(token, use_cache=True, **kwargs).logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    return {"engine": engine, "cache": cache_name, "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens,
            "prefill_s": t1 - t0, "decode_tok_s": new_tokens / (t2 - t1), "threads": torch.get_num_threads()}
