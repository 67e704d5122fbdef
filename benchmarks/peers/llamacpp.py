"""llama.cpp's quantized KV cache (through llama-cpp-python) on the same GGUF and the same token ids.

How it is evaluated, and why that is decode-faithful: each window is decoded from an empty KV
cache with all-token logits. In a llama.cpp ubatch, the new tokens' K and V are first copied
(quantized) into the cache tensors, and flash attention then reads views of those tensors, so
every token attends to quantized K/V, its own and its ubatch neighbours' included; generation
one token at a time does the same (write the token's K/V, then attend over the cache). Measured
here (SmolLM2-135M, 256 tokens): with a quantized cache the logits of a whole-window ubatch and
of ubatches of 32 or 1 token are bit-identical, so quantized types run the window in one ubatch.
An f16/f32 cache is different: a multi-token ubatch takes another CPU flash-attention path
(tiled, f32 accumulation) than single-token decode, and the two differ by a KL of ~3.5e-3, about
as much as q8_0 vs f16. So f16/f32 rows, and the reference, run one token per ubatch: exactly
what generation computes. The batched-f32 vs decode-f32 KL is reported as llama.cpp's own noise
floor (its activations are re-quantized to q8 blocks for every Q4_1 matmul, so any numeric
change, benign or not, costs about that much KL). Unlike kvtuner and the transformers caches
there is no full-precision residual window: llama.cpp quantizes every token at once.

The reference is the same engine with an f32 KV cache (f16 if f32 is refused), so KL measures
only what the cache type changes, not llama.cpp's Q4_1 x q8_1 matmuls against transformers'
dequantized fp32 weights (those two differ by a KL of ~3e-3 on their own). Flash attention is on
for every row: llama.cpp needs it for a quantized V cache. With a quantized K, llama.cpp's CPU
flash attention also converts Q to K's dot-product type (q8_0/q8_1), part of what it costs.

Weights run on ggml's plain CPU path (``use_extra_bufts = False``): on this machine (AVX512 +
AMX, llama.cpp built with ``-DGGML_NATIVE=ON``) the AMX extra buffer type segfaults inside
``ggml_backend_amx_mul_mat`` on the first decode; the KV cache and attention are unaffected.
Quality runs use one thread by default: on a shared 2-core machine ggml's spinning OpenMP
barriers made two threads slower than one (logits do not depend on the thread count).

Bits: the GGML block formats' exact sizes from ``gguf.GGML_QUANT_SIZES`` (e.g. q4_0 stores 32
values in 18 bytes = 4.5 bits); the cache tensors are exactly n_ctx x n_embd_kv of that type.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tqdm.auto import tqdm

from peers.common import PeerUnavailable, Row, Scores, log_softmax

NOMINAL_BITS = {"f32": 32, "f16": 16, "q8_0": 8, "q5_1": 5, "q5_0": 5, "q4_1": 4, "q4_0": 4, "iq4_nl": 4}
# (K type, V type): the uniform types, then the two mixed pairs
CONFIGS = [(t, t) for t in ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")] + [("q8_0", "q4_0"), ("q4_0", "q8_0")]


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def effective_bits(name: str) -> float:
    """Stored bits per element of a GGML type: 8 * block bytes / block values."""
    block, nbytes = GGML_QUANT_SIZES[ggml_type(name)]
    return 8 * nbytes / block


def label(k: str, v: str) -> str:
    return k if k == v else f"K {k} / V {v}"


def check_available(model_path: Path) -> None:
    if model_path.suffix != ".gguf" or not model_path.is_file():
        raise PeerUnavailable(f"llama.cpp: needs a local .gguf model file, not {str(model_path)!r}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise PeerUnavailable(
            "llama.cpp: package 'llama-cpp-python' is not installed "
            "(CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python; it builds llama.cpp from source)"
        )


@contextlib.contextmanager
def _plain_cpu_weights(lib):
    """Make ``Llama`` load weights without extra buffer types (AMX/repack); its __init__ offers no argument."""
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


UNQUANTIZED = ("f32", "f16")


@dataclass
class LlamaCppRunner:
    model_path: Path
    window: int
    ubatch: int | None = None  # None: 1 for f16/f32 caches, the whole window for quantized ones
    threads: int = 1

    def ubatch_for(self, k: str, v: str) -> int:
        if self.ubatch:
            return min(self.ubatch, self.window)
        return 1 if k in UNQUANTIZED and v in UNQUANTIZED else self.window

    def _open(self, k: str, v: str, ubatch: int, n_ctx: int | None = None, logits_all: bool = True,
              threads: int | None = None):
        import llama_cpp.llama_cpp as lib
        from llama_cpp import Llama

        n_ctx = n_ctx or self.window
        batch = self.window if logits_all else 512
        threads = threads or self.threads
        with _plain_cpu_weights(lib):
            return Llama(
                model_path=str(self.model_path),
                n_ctx=n_ctx,
                n_batch=batch,
                n_ubatch=min(ubatch, batch),
                n_threads=threads,
                n_threads_batch=threads,
                type_k=int(ggml_type(k)),
                type_v=int(ggml_type(v)),
                flash_attn=True,
                logits_all=logits_all,
                n_gpu_layers=0,
                verbose=False,
            )

    def window_logprobs(self, k: str, v: str, windows: torch.Tensor, ubatch: int | None = None) -> Iterator[torch.Tensor]:
        """Log-probs [T, V] of each window in turn, each decoded from an empty cache of type (k, v)."""
        llm = self._open(k, v, ubatch or self.ubatch_for(k, v))
        try:
            for ids in windows:
                llm.reset()  # n_tokens = 0: the next eval removes every cached cell first
                llm.eval(ids.tolist())
                yield log_softmax(np.array(llm.scores[: ids.numel()], copy=True))
        finally:
            llm.close()

    def reference(self, windows: torch.Tensor, progress: bool) -> tuple[str, list[torch.Tensor]]:
        """The full-precision reference: f32 KV, or f16 where f32 is refused."""
        for kv in UNQUANTIZED:
            try:
                logprobs = self.window_logprobs(kv, kv, windows)
                return kv, list(tqdm(logprobs, desc=f"llama.cpp {kv} reference", total=len(windows),
                                     disable=not progress, unit="window", leave=False))
            except (ValueError, RuntimeError) as e:  # llama-cpp-python raises ValueError when a context fails
                print(f"llama.cpp: {kv} KV cache not usable as reference ({e}); trying the next")
        raise PeerUnavailable("llama.cpp: neither an f32 nor an f16 KV cache could be created")

    def evaluate(self, windows: torch.Tensor, configs=CONFIGS, progress: bool = True) -> tuple[list[Row], dict]:
        """Rows for every (K, V) type pair, plus facts: reference type and perplexity, the noise floor."""
        ref_type, refs = self.reference(windows, progress)
        ref_scores = Scores()
        for ref, ids in zip(refs, windows):
            ref_scores.add(ref, ref, ids)
        facts = {"reference": ref_type, "reference_ppl": ref_scores.row("", "", 0, 0).ppl}
        if self.ubatch_for(ref_type, ref_type) != self.window:
            floor = Scores()
            for ref, ids, logprobs in zip(refs, windows, self.window_logprobs(ref_type, ref_type, windows, self.window)):
                floor.add(ref, logprobs, ids)
            facts["noise_floor_kl"] = floor.kl / floor.positions
        rows = []
        for k, v in tqdm(configs, desc="llama.cpp", disable=not progress, unit="config"):
            scores = Scores()
            for ref, ids, logprobs in zip(refs, windows, self.window_logprobs(k, v, windows)):
                scores.add(ref, logprobs, ids)
            nominal = (NOMINAL_BITS[k] + NOMINAL_BITS[v]) / 2
            eff = (effective_bits(k) + effective_bits(v)) / 2
            note = f"vs {ref_type} KV (ubatch 1); ubatch {self.ubatch_for(k, v)}; flash_attn"
            rows.append(scores.row("llama.cpp", label(k, v), nominal, eff, note=note))
        return rows, facts

    def generation_speed(self, k: str, v: str, prompt: list[int], new_tokens: int, threads: int) -> dict:
        """Greedy generation: seconds to the first token (prefill) and decode tokens/s for ``new_tokens`` more."""
        llm = self._open(k, v, 512, n_ctx=len(prompt) + new_tokens + 8, logits_all=False, threads=threads)
        with contextlib.closing(llm):
            gen = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
            t0 = time.perf_counter()
            next(gen)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                next(gen)
            t2 = time.perf_counter()
        return {"engine": "llama.cpp", "cache": label(k, v), "prompt_tokens": len(prompt), "new_tokens": new_tokens,
                "prefill_s": t1 - t0, "decode_tok_s": new_tokens / (t2 - t1), "threads": threads}
