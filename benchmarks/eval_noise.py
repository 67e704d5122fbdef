"""How far float rounding alone moves a decode-faithful score: one config, three float32 attention paths.

The paths compute the same attention to ~1.5e-7 relative on the same inputs: the packed streaming path the
Evaluator uses (``use_packed_attention(backend="torch")``), and the history read back whole and attended by the
model's own SDPA or eager attention. Quantization amplifies their rounding differences (a value within noise of
a code boundary takes either code, and later layers and chunks see a slightly different cache), so the spread
of the scores below is the noise floor of one window's measurement.

    PYTHONPATH=src python benchmarks/eval_noise.py --kv K4V4 K2V2 --tokens 2048
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import torch

from kvtuner import KVConfig, MixedPrecisionCache
from kvtuner.config import KVConfigError
from kvtuner.cache.attention import use_packed_attention
from kvtuner.evaluate import DataError, token_windows
from kvtuner.evaluate.runner import decode_chunk_size, score_chunks
from kvtuner.models import load_model


def score(model, ids, ref, config: KVConfig, path: str) -> tuple[float, float, float]:
    """(KL, top-1, perplexity) of ``config`` on ``ids`` with the given attention path."""
    model.set_attn_implementation("eager" if path == "eager" else "sdpa")
    cache = MixedPrecisionCache(config, model.config, keep_dequantized=True)
    packed = use_packed_attention(model, cache, backend="torch") if path == "packed" else contextlib.nullcontext()
    with packed:
        kl, nll, top1 = score_chunks(model, ids, ref, cache, decode_chunk_size(config, ids.shape[1]))
    return kl / ids.numel(), top1 / ids.numel(), math.exp(nll / (ids.numel() - ids.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="../shared/data/wikitext2_raw_test.txt")
    ap.add_argument("--kv", nargs="+", default=["K4V4", "K2V2"])
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    for kv in args.kv:
        try:
            KVConfig.uniform(kv, 1)
        except KVConfigError as err:
            ap.error(f"--kv {kv}: {err}")
    if not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file")
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    try:
        ids = token_windows(args.data, tokenizer, window=args.tokens)[:1]
    except DataError as err:
        ap.error(str(err))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
    layers = model.config.num_hidden_layers
    print(f"{'kv':6} {'path':7} {'KL':>10} {'top-1':>7} {'ppl':>8}")
    for kv in args.kv:
        for path in ("packed", "sdpa", "eager"):
            kl, top1, ppl = score(model, ids, ref, KVConfig.uniform(kv, layers), path)
            print(f"{kv:6} {path:7} {kl:10.4e} {top1:7.4f} {ppl:8.3f}", flush=True)


if __name__ == "__main__":
    main()
