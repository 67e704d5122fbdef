"""One layer's decode-attention step on the CPU: the C++ kernel and the tiled torch path over packed KV, against
fp32 SDPA over the same tokens stored contiguously (what ``StaticCache`` attends to), in the same run.

The default model's attention shape (3 KV heads, 9 query heads, head dim 64), random K/V quantized KIVI-style
(keys per channel, values per token, groups of 32), one sequence, a 20-token residual. Best of ``--repeats``
batches of ``--calls`` calls, in milliseconds a call.

    PYTHONPATH=src python benchmarks/bench_cpu_attention.py --tokens 8000 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from kvtuner.kernels import decode_attention
from kvtuner.quant import QuantSpec, quantize

H_KV, H_Q, D = 3, 9, 64


def best_ms(fn, calls: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", nargs="+", default=["K4V4", "K2V2", "K8V8"])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.tokens < 32 or args.tokens % 32:
        ap.error("--tokens must be a positive multiple of 32 (whole key groups)")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, H_KV, args.tokens, D, generator=g) for _ in range(2))
    query = torch.randn(1, H_Q, D, generator=g)
    residual = torch.randn(1, H_KV, 20, D, generator=g)
    full_k, full_v = torch.cat([keys, residual], dim=-2), torch.cat([values, residual], dim=-2)
    sdpa = best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None], full_k, full_v, enable_gqa=True), args.calls, args.repeats)
    print(f"{args.tokens} tokens, {args.threads} thread(s); fp32 SDPA over contiguous K/V: {sdpa:.3f} ms")
    for pair in args.pairs:
        k_bits, v_bits = (int(pair[2]), int(pair[2])) if pair.startswith("KV") else (int(pair[1]), int(pair[3]))
        specs = QuantSpec(k_bits, 32, "channel"), QuantSpec(v_bits, 32, "token")
        qkeys, qvalues = quantize(keys, specs[0]), quantize(values, specs[1])
        times = {backend: best_ms(lambda b=backend: decode_attention(query, qkeys, qvalues, residual, residual, D**-0.5,
                                                                     *specs, backend=b), args.calls, args.repeats)
                 for backend in ("native", "torch")}
        print(f"{pair}: C++ kernel {times['native']:.3f} ms ({sdpa / times['native']:.2f}x SDPA), "
              f"torch path {times['torch']:.3f} ms ({sdpa / times['torch']:.2f}x SDPA)")


if __name__ == "__main__":
    main()
