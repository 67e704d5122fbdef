"""Decode-faithful quality evaluation of a KV config against the full-precision cache.

The text is fed in chunks the way generation sees it: each chunk attends to the quantized
history plus the full-precision residual, and is then flushed into the cache like decoded
tokens. With chunks aligned to every layer's residual window this is exactly what token-by-token
generation computes (a token sees its own window in full precision and everything older
quantized), at a fraction of the cost; not a whole-prompt fake quantization.

Each chunk attends over the packed history tile by tile in float32
(:func:`~kvtuner.kernels.streaming.chunk_attention_streaming`, inside ``use_packed_attention`` with the torch
backend), so no full-precision copy of a layer's history is kept; layers that path does not read
(outliers, pre-RoPE keys, kvquant ranges, sliding windows) keep one, read back once and extended at each flush.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from functools import reduce

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kvtuner.cache import MixedPrecisionCache, cache_kwargs
from kvtuner.cache.attention import use_packed_attention
from kvtuner.config import KVConfig
from kvtuner.evaluate.metrics import kl_sum, nll_sum, top1_matches
from kvtuner.method import Calibration


@dataclass
class EvalResult:
    name: str
    ppl: float
    kl: float
    top1: float
    avg_bits: float  # nominal, averaged over layers and K/V
    effective_bits: float  # 16 * real bytes / fp16 bytes of the same tokens
    kv_bytes: int
    kv_bytes_fp16: int
    tokens: int
    chunk_size: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def decode_chunk_size(config: KVConfig, length: int) -> int:
    """Largest chunk that keeps every layer decode-faithful: the gcd of the quantized layers' windows."""
    windows = [s.window for s in config.layers if s.is_quantized]
    return reduce(math.gcd, windows) if windows else length


@torch.no_grad()
def chunked_logprobs(model: PreTrainedModel, input_ids: torch.Tensor, cache, chunk_size: int, progress: str | None = None):
    """Yield (start, log-probs [B, C, V]) chunk by chunk, feeding ``cache`` as generation would."""
    length = input_ids.shape[1]
    starts = range(0, length, chunk_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False, unit="chunk"):
        chunk = input_ids[:, start : start + chunk_size]
        logits = model(chunk, use_cache=True, **cache_kwargs(model, cache)).logits
        yield start, torch.log_softmax(logits.float(), dim=-1)


def score_chunks(model: PreTrainedModel, input_ids: torch.Tensor, ref_logprobs: torch.Tensor, cache, chunk_size: int,
                 progress: str | None = None) -> tuple[float, float, int]:
    """Summed KL(reference || cache), next-token NLL and top-1 agreements of ``input_ids`` fed through ``cache``
    in chunks (:func:`chunked_logprobs`), against ``ref_logprobs`` ``[B, T, V]``."""
    length = input_ids.shape[1]
    vocab = ref_logprobs.shape[-1]
    kl = nll = 0.0
    top1 = 0
    for start, logprobs in chunked_logprobs(model, input_ids, cache, chunk_size, progress):
        end = start + logprobs.shape[1]
        ref = ref_logprobs[:, start:end].reshape(-1, vocab)
        flat = logprobs.reshape(-1, vocab)
        kl += kl_sum(ref, flat)
        top1 += top1_matches(ref, flat)
        usable = min(end, length - 1) - start  # the last position has no next token
        if usable > 0:
            nll += nll_sum(logprobs[:, :usable].reshape(-1, vocab), input_ids[:, start + 1 : start + 1 + usable].reshape(-1))
    return kl, nll, top1


class Evaluator:
    """Holds the model, the tokens and the full-precision reference, to score many configs.

    calibration: NUQ levels and outlier thresholds for configs that need them (default: the file
    each config names).
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, progress: bool = False,
                 calibration: Calibration | None = None):
        self.model = model
        self.calibration = calibration
        self.input_ids = input_ids.to(model.device)
        self.progress = progress
        with torch.no_grad():
            logits = model(self.input_ids, use_cache=False).logits
        self.ref_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def reference_ppl(self) -> float:
        targets = self.input_ids[:, 1:].reshape(-1)
        nll = nll_sum(self.ref_logprobs[:, :-1].reshape(-1, self.ref_logprobs.shape[-1]), targets)
        return math.exp(nll / targets.numel())

    def evaluate(self, config: KVConfig, chunk_size: int | None = None) -> EvalResult:
        t0 = time.perf_counter()
        ids = self.input_ids
        batch, length = ids.shape
        chunk = chunk_size or decode_chunk_size(config, length)
        cache = MixedPrecisionCache(config, self.model.config, keep_dequantized=True, calibration=self.calibration)
        desc = f"eval {config.name or 'config'}" if self.progress else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*decode on the torch path")  # which layers read back: no news
            with use_packed_attention(self.model, cache, backend="torch"):
                kl, nll, top1 = score_chunks(self.model, ids, self.ref_logprobs, cache, chunk, desc)
        n = batch * length
        kv_bytes, kv_fp16 = cache.nbytes(), cache.nbytes_fp16()
        return EvalResult(
            name=config.name,
            ppl=math.exp(nll / (batch * (length - 1))),
            kl=kl / n,
            top1=top1 / n,
            avg_bits=config.avg_bits,
            effective_bits=16 * kv_bytes / kv_fp16,
            kv_bytes=kv_bytes,
            kv_bytes_fp16=kv_fp16,
            tokens=n,
            chunk_size=chunk,
            seconds=time.perf_counter() - t0,
        )

