"""Launch variants of the Gluon decode kernel (register cap, history splits, L2 prefetch, shared-memory stages,
the merge's launch) against bf16 SDPA, CUDA-graph GPU time.

    PYTHONPATH=src python benchmarks/gluon_sweep.py --points 1:32768 16:32768 --kv K4V4 K2V2 \
        [--variants default "stages 0" "prefetch 2"] [--flush write read]

"default" is what ``decode_attention_gluon`` picks (2 shared-memory stages for 2- and 4-bit sides, the merge
launched as a programmatic dependent on sm_90); the splits printed are those the kernel runs (whole blocks a split).
"history only" leaves the merge out (its time is the difference), "merge after" launches it the ordinary way,
"wide dependent merge" as a dependent in the ordinary launch's shape (``decode.MERGE_LAUNCH``, 4 warps) instead of
the default one warp (``decode.DEPENDENT_MERGE_LAUNCH``).
``--flush``: how L2 is emptied before each call (:func:`bench_attention.graph_ms`), SDPA timed the same way.
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from bench_attention import D, FLUSHES, H_KV, H_Q, KV, RESIDUAL, batch_tokens, graph_ms, pack
from kvtuner.kernels.decode import MERGE_LAUNCH, default_num_splits
from kvtuner.kernels.gluon_decode import BLOCK, decode_attention_gluon
from kvtuner.kernels.gluon_layout import split_plan

VARIANTS = {"default": {}, "stages 0": {"stages": 0}, "maxnreg 168": {"maxnreg": 168},
            "splits x2": {"split_factor": 2.0}, "splits x0.5": {"split_factor": 0.5}, "prefetch 1": {"prefetch": 1},
            "prefetch 2": {"prefetch": 2}, "prefetch 4": {"prefetch": 4}, "stages 2": {"stages": 2},
            "stages 3": {"stages": 3}, "stages 4": {"stages": 4},  # a prefetch runs without stages
            # more programs an SM: a register cap (the spare ones spilled) and splits planned for that many (shared
            # memory may allow fewer: K4V4's 2 stages, 20 KiB a program, at most 10)
            **{f"{n} programs/SM": {"maxnreg": 65536 // (32 * n) // 8 * 8, "split_factor": n / 8} for n in (10, 11, 12)},
            "history only": {"patch": ("kvtuner.kernels.decode.merge_with_residual", lambda *args, **kw: args[4])},
            "merge after": {"patch": ("kvtuner.kernels.gluon_decode._has_dependent_launch", lambda device: False)},
            "wide dependent merge": {"patch": ("kvtuner.kernels.decode.DEPENDENT_MERGE_LAUNCH", MERGE_LAUNCH)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", type=batch_tokens, metavar="B:T",
                    default=[(1, 32768), (4, 32768), (16, 32768), (64, 16384)])
    ap.add_argument("--kv", nargs="+", default=["K4V4", "K2V2", "K8V8"], choices=list(KV))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                    help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--flush", nargs="+", default=["write"], choices=FLUSHES)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    print(f"{'B':>3} {'T':>7} {'flush':5} {'kv':5} {'variant':12} {'ms':>7} {'x sdpa':>6}")
    for batch, context in args.points:
        q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, H_KV, context, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        res = k[:, :, -RESIDUAL:], v[:, :, -RESIDUAL:]
        packed = {name: pack(k[:, :, :-RESIDUAL], v[:, :, :-RESIDUAL], *KV[name]) for name in args.kv}
        for flush in args.flush:
            sdpa = graph_ms(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True), flush=flush)
            for name, (qk, qv) in packed.items():
                blocks = -(-qk.num_tokens // BLOCK)
                splits = default_num_splits(blocks, batch * H_KV, q.device, ctas_per_sm=8)
                g_k = qk.spec.group_len(qk.shape)
                for label in args.variants:
                    opts = dict(VARIANTS[label])
                    factor = opts.pop("split_factor", 1.0)
                    patch = mock.patch(*opts.pop("patch")) if "patch" in opts else contextlib.nullcontext()
                    n = max(1, min(blocks, round(splits * factor)))
                    with patch:
                        ms = graph_ms(lambda: decode_attention_gluon(q, qk, qv, *res, D**-0.5, num_splits=n, **opts),
                                      flush=flush)
                    runs = split_plan(qk.num_tokens // g_k, g_k, n)[0]
                    print(f"{batch:>3} {context:>7} {flush:5} {name:5} {label:12} {ms:7.3f} {sdpa / ms:6.2f}  "
                          f"(splits {runs})")


if __name__ == "__main__":
    main()
