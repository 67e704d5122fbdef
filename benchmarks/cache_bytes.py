"""Stored bytes of the cache at aligned and non-aligned lengths: what ``nbytes()`` counts, residual included.

The default model's attention shape (30 layers, 3 KV heads, head dim 64, fp32 K/V as on these CPUs),
random K/V fed as one prompt of T tokens, no model run (bytes do not depend on values). A layer then holds
the whole 32-token windows packed and the rest (T mod 32 tokens) in the full-precision residual.

    PYTHONPATH=src python benchmarks/cache_bytes.py --tokens 2047 2048 2050 --kv KV8 K4V4 K2V2
"""

from __future__ import annotations

import argparse

import torch

from kvtuner.cache import MixedPrecisionCache
from kvtuner.config import KVConfig
from kvtuner.models import load_model_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2047, 2048, 2050])
    ap.add_argument("--kv", nargs="+", default=["KV8", "K4V4", "K2V2"])
    args = ap.parse_args()
    config = load_model_config()
    layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    print(f"| config | {' | '.join(f'{t} tokens' for t in args.tokens)} |")
    print(f"|---|{'---|' * len(args.tokens)}")
    for kv in ["fp32 (model dtype)", *args.kv]:
        cells = []
        for tokens in args.tokens:
            if kv.startswith("fp32"):
                cells.append(f"{2 * layers * heads * tokens * dim * 4:,}")
                continue
            cache = MixedPrecisionCache(KVConfig.uniform(kv, layers), config)
            for layer in range(layers):
                k = torch.randn(1, heads, tokens, dim)
                cache.update(k, k.clone(), layer)
            nbytes, fp16 = cache.nbytes(), cache.nbytes_fp16()
            cells.append(f"{nbytes:,} ({nbytes / fp16:.4f}×, {cache.layers[0].keys.shape[-2]} in residual)")
        print(f"| {kv} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
