"""Compile the packed decode kernel for sm_90 without a GPU and count the SASS instructions of its history loop.

The kernel is bound by instruction issue, so the count a warp issues per cached token is the number to
watch between device runs: its floor time is tokens x count / (4 schedulers x SMs x clock). Compiles
the Llama-3.1-8B attention shape (D 128, 4 query heads a KV head, groups of 32) with the launcher's own
defaults (``default_num_warps``, 168 registers for 4 warps), the stride specializations a real launch
gets, and Triton's bundled ``cuobjdump``. Needs triton (the device has 3.6; counts differ across versions).

    PYTHONPATH=src python benchmarks/sass_decode.py K4V4 K2V2 [--warps 2] [--maxnreg 200]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvtuner.kernels import decode

D, R, G = 128, 4, 32
NOT_SPECIALIZED = {"n_hist", "n_res", "steps_per_split", "num_splits", "qk_scale"}  # as in the kernel's decorator
POINTERS = {"Q": "*bf16", "KW": "*i32", "KS": "*fp16", "KZ": "*fp16", "VW": "*i32", "VS": "*fp16", "VZ": "*fp16",
            "KR": "*bf16", "VR": "*bf16", "O_part": "*fp32", "LSE_part": "*fp32"}


def compile_kernel(k_bits: int, v_bits: int, warps: int, maxnreg: int | None, stages: int = 2):
    fn = decode._decode_split_kernel
    ngv = D // G
    m = max(16, R * ngv)
    consts = dict(H_KV=8, R=R, R_P=R, M=m, NG=min(m // R, 128 // G), NGV=ngv, D=D, G_K=G, G_V=G, K_BITS=k_bits,
                  V_BITS=v_bits, W=warps, NR=32, ASM=True, SHORT=False,
                  skw_t=D * k_bits // 32, sks_g=D, svw_t=D * v_bits // 32, svs_t=ngv)
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32") for n in fn.arg_names}
    # a real launch sees 16-byte aligned pointers and strides that are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n not in NOT_SPECIALIZED}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def history_loop(sass: str) -> tuple[list[str], int]:
    """Instructions of the loop with the most HMMAs, and how many of them sit in forward-branched blocks."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    best, skipped = [], 0
    for i, (_, text) in enumerate(ins):
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) in index and index[int(target.group(1), 16)] < i:
            body = ins[index[int(target.group(1), 16)] : i + 1]
            if sum("HMMA" in t for _, t in body) > sum("HMMA" in t for t in best):
                best = [t for _, t in body]
                skipped = 0
                for j, (_, t) in enumerate(body):  # conditional forward branches inside: blocks most steps skip
                    fwd = re.search(r"^@!?P\d\s+BRA\s+0x([0-9a-f]+)", t)
                    if fwd and index.get(int(fwd.group(1), 16), -1) > index[body[j][0]]:
                        skipped += index[int(fwd.group(1), 16)] - index[body[j][0]] - 1
    return best, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kv", nargs="+", help="bit pairs such as K4V4")
    ap.add_argument("--warps", type=int, help="default: the launcher's default_num_warps")
    ap.add_argument("--maxnreg", type=int, help="default: the launcher's (168 for 4 warps, else none)")
    args = ap.parse_args()
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    print(f"triton {triton.__version__}, sm_90, D={D}, {R} query heads a KV head, groups of {G}")
    for kv in args.kv:
        k_bits, v_bits = int(kv[1]), int(kv[3])
        warps = args.warps or decode.default_num_warps(k_bits, v_bits)
        maxnreg = args.maxnreg or (168 if warps == 4 else None)
        kernel = compile_kernel(k_bits, v_bits, warps, maxnreg)
        cubin = Path(f"/tmp/kvtuner_{kv}_w{warps}.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        loop, skipped = history_loop(subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout)
        per_step = len(loop) - skipped
        tokens = 128 // warps  # a step is 128 tokens, one slice a warp
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in loop)
        print(f"\n{kv}: {warps} warps, {regs.group(1)} registers, {regs.group(2)} B stack; loop {len(loop)} instructions "
              f"({skipped} in blocks most steps skip): {per_step} a warp-step of {tokens} tokens, "
              f"{per_step / tokens:.1f} a token")
        print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(24)))


if __name__ == "__main__":
    main()
