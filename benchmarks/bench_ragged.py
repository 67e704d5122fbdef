"""A left-padded batch's decode attention on the GPU: one launch over rows stored apart (each row's own lengths and
buffers, read from a table on the device) against one launch a row, at the Llama-3.1-8B attention shape (32 query
heads, 8 KV heads, D 128) and against each row dispatched alone (``auto``: the Gluon kernel where it is preferred),
beside bf16 SDPA over the padded, masked cache a ``DynamicCache`` user would hold. ``speedup``: one launch against
the faster of the two a-row paths.

Row i of a batch of B holds ``T * (1 + 3 i / (B - 1)) / 4`` tokens (prompts from a quarter of ``T`` to ``T``): the
history packed with groups of 32 (``kernels.quantize``), the last 32 tokens in a bf16 residual. Times are eager
medians (``do_bench``, L2 flushed before each call), host launch cost included: that cost is what one launch saves.
The three kernel paths are checked against each other before timing. Prints a table and writes ``ragged_<gpu>.json``.

    PYTHONPATH=src python benchmarks/bench_ragged.py --batches 4 16 --contexts 4096 32768 --kv K4V4 K2V2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_attention import D, GROUP, H_KV, H_Q, KV, RESIDUAL, gpu_name, median_ms, nbytes, pack
from kvtuner import kernels
from kvtuner.config import write_atomic
from kvtuner.kernels.decode import decode_attention_triton, decode_attention_triton_rows


def row_lengths(batch: int, context: int) -> list[int]:
    """Tokens of each row, a quarter of ``context`` to all of it, whole groups in the history."""
    spread = [context // 4 + (3 * context // 4) * i // max(batch - 1, 1) for i in range(batch)]
    return [RESIDUAL + (n - RESIDUAL) // GROUP * GROUP for n in spread]


def bench_point(batch: int, context: int, name: str) -> list[dict]:
    lengths = row_lengths(batch, context)
    q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
    rows, read = [], nbytes(q)
    for n in lengths:
        k = torch.randn(1, H_KV, n, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qk, qv = pack(k[:, :, :-RESIDUAL], v[:, :, :-RESIDUAL], *KV[name])
        rows.append((qk, qv, k[:, :, -RESIDUAL:].contiguous(), v[:, :, -RESIDUAL:].contiguous(), 0))
        read += nbytes(*qk.stored_tensors(), *qv.stored_tensors(), rows[-1][2], rows[-1][3])
        del k, v

    def per_row():
        return torch.cat([decode_attention_triton(q[i : i + 1], *row[:4], D**-0.5) for i, row in enumerate(rows)])

    def per_row_auto():  # what a padded batch ran before one launch: each row dispatched alone (Gluon where preferred)
        spec = rows[0][0].spec, rows[0][1].spec
        return torch.cat([kernels.decode_attention(q[i : i + 1], *row[:4], D**-0.5, *spec) for i, row in enumerate(rows)])

    def one_launch():
        return decode_attention_triton_rows(q, rows, D**-0.5)

    a = per_row().double()
    err = max(((a - other().double()).norm() / a.norm()).item() for other in (one_launch, per_row_auto))
    if err > 1e-2:
        raise AssertionError(f"one launch, a launch a row and auto a row disagree: {err:.2e} relative")
    # bf16 SDPA over the padded batch: every row right-aligned in [B, H_kv, T, D], its pads masked
    keys = torch.randn(batch, H_KV, max(lengths), D, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    mask = torch.arange(max(lengths), device="cuda")[None] >= torch.tensor([max(lengths) - n for n in lengths],
                                                                            device="cuda")[:, None]
    mask = mask[:, None, None, :]
    q4 = q.unsqueeze(2)
    out = [dict(impl="sdpa_padded_bf16", kv="bf16", bytes_read=nbytes(q, keys, values),
                ms=median_ms(lambda: F.scaled_dot_product_attention(q4, keys, values, mask, enable_gqa=True)))]
    out += [dict(impl="launch_a_row", kv=name, bytes_read=read, ms=median_ms(per_row)),
            dict(impl="auto_a_row", kv=name, bytes_read=read, ms=median_ms(per_row_auto)),
            dict(impl="one_launch", kv=name, bytes_read=read, ms=median_ms(one_launch))]
    return [dict(r, batch=batch, context=context, lengths=lengths, gbps=r["bytes_read"] / r["ms"] / 1e6,
                 agreement=err) for r in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--kv", nargs="+", default=["K4V4", "K2V2"], choices=list(KV))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if min(args.batches) < 1:
        ap.error("--batches takes positive integers")
    if min(args.contexts) < 4 * (RESIDUAL + GROUP):
        ap.error(f"--contexts must be at least {4 * (RESIDUAL + GROUP)} tokens (a quarter holds a group)")
    if not torch.cuda.is_available():
        raise SystemExit("bench_ragged needs a CUDA GPU")
    results = []
    print(f"{torch.cuda.get_device_name()}: B rows of T/4..T tokens; ms (GB/s of the bytes each path reads)")
    print(f"{'B':>3} {'T':>6} {'kv':>5} {'sdpa_padded_bf16':>18} {'launch_a_row':>16} {'auto_a_row':>16} "
          f"{'one_launch':>16} {'speedup':>8}")
    for batch in args.batches:
        for context in args.contexts:
            for name in args.kv:
                rows = bench_point(batch, context, name)
                results += rows
                ms = {r["impl"]: r for r in rows}
                cell = lambda r: f"{r['ms']:.3f} ({r['gbps']:.0f})"  # noqa: E731
                print(f"{batch:>3} {context:>6} {name:>5} {cell(ms['sdpa_padded_bf16']):>18} "
                      f"{cell(ms['launch_a_row']):>16} {cell(ms['auto_a_row']):>16} {cell(ms['one_launch']):>16} "
                      f"{min(ms['launch_a_row']['ms'], ms['auto_a_row']['ms']) / ms['one_launch']['ms']:>7.2f}x")
                torch.cuda.empty_cache()
    path = args.out / f"ragged_{gpu_name()}.json"
    write_atomic(path, json.dumps(dict(device=torch.cuda.get_device_name(), rows=results), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
