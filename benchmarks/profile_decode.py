"""Run the packed decode kernel a few times on random data, for a profiler to pick one launch.

    ncu --clock-control none -k regex:_decode_split --launch-skip 3 --launch-count 1 --set full \
        -o k4v4 python3 benchmarks/profile_decode.py K4V4 16 32768

Arguments: the bit pair (``K4V4``), batch, context, and optionally launch options as JSON
(``'{"num_stages": 3}'``). Shapes as in ``bench_attention.py`` (Llama-3.1-8B attention).
"""

from __future__ import annotations

import json
import sys

import torch

from bench_attention import D, H_KV, H_Q, RESIDUAL, pack
from kvtuner.kernels.decode import decode_attention_triton


def main() -> None:
    kv, batch, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    launch = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, H_KV, context, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qk, qv = pack(k[:, :, :-RESIDUAL], v[:, :, :-RESIDUAL], int(kv[1]), int(kv[3]))
    residual = k[:, :, -RESIDUAL:].contiguous(), v[:, :, -RESIDUAL:].contiguous()
    del k, v
    for _ in range(4):
        decode_attention_triton(q, qk, qv, *residual, D**-0.5, **launch)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
