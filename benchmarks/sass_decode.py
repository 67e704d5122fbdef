"""Compile the packed decode kernel for sm_90 without a GPU and count the SASS instructions of its history loop.

The kernel is bound by instruction issue, so the count a warp issues per cached token is the number to
watch between device runs: its floor time is tokens x count / (4 schedulers x SMs x clock). Compiles
the Llama-3.1-8B attention shape (D 128, 4 query heads a KV head, groups of 32) with the launcher's own
defaults (``default_num_warps``, ``default_maxnreg``), the stride specializations a real launch
gets, and Triton's bundled ``cuobjdump``. Needs triton (the device has 3.6; counts differ across versions).

    PYTHONPATH=src python benchmarks/sass_decode.py K4V4 K2V2 [--warps 2] [--maxnreg 200] [--per-row]
    PYTHONPATH=.venv/gluon-triton:src python benchmarks/sass_decode.py --gluon K4V4 K2V2 [--prefetch 2]  # triton 3.6
"""

from __future__ import annotations

import argparse
import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvtuner.kernels import decode
from kvtuner.kernels.sass import disassemble, hot_loop, loop_census

D, R, G = 128, 4, 32
BITS = (2, 3, 4, 8)  # what the kernel decodes
POINTERS = {"Q": "*bf16", "KW": "*i32", "KS": "*fp16", "KZ": "*fp16", "VW": "*i32", "VS": "*fp16", "VZ": "*fp16",
            "KL": "*i32", "VL": "*i32", "KR": "*bf16", "VR": "*bf16", "O_part": "*fp32", "LSE_part": "*fp32",
            "LENGTHS": "*i32", "ROWS": "*i64"}


def bit_pair(text: str) -> tuple[int, int, bool]:
    """``KxVy`` or ``KxVy+nuq`` (codes indexing level tables): (x, y, codebook)."""
    match = re.fullmatch(r"K(\d)V(\d)(\+nuq)?", text)
    if not match or {int(match[1]), int(match[2])} - set(BITS) or (match[3] and max(int(match[1]), int(match[2])) > 4):
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit pair KxVy[+nuq] with x, y in {BITS} (<= 4 with +nuq)")
    return int(match[1]), int(match[2]), bool(match[3])


def compile_kernel(k_bits: int, v_bits: int, warps: int, maxnreg: int | None, stages: int = 2, codebook: bool = False,
                   per_row: bool = False):
    """per_row: the ragged-batch variant, each row's tensors and strides read from a table (``PER_ROW``)."""
    fn = decode._decode_split_kernel
    ngv, m, ng = decode.stacking(R, D, G, G)
    consts = dict(H_KV=8, R=R, R_P=R, M=m, NG=ng, NGV=ngv, D=D, G_K=G, G_V=G, K_BITS=k_bits,
                  V_BITS=v_bits, W=warps, NR=32, ASM=True, SHORT=False,
                  K_NUQ=2**k_bits if codebook else 0, V_NUQ=2**v_bits if codebook else 0,
                  skw_t=D * k_bits // 32, sks_g=D, svw_t=D * v_bits // 32, svs_t=ngv,
                  DEVICE_LENGTHS=False, PER_ROW=per_row, ALIGNED=per_row)
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32") for n in fn.arg_names}
    # a real launch sees 16-byte aligned pointers and strides that are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] in ("i32", *POINTERS.values()) and not {i, n} & set(fn.do_not_specialize)}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), ng * G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kv", nargs="+", type=bit_pair, help="bit pairs such as K4V4 or K4V4+nuq")
    ap.add_argument("--warps", type=int, choices=(1, 2, 4, 8), help="default: the launcher's default_num_warps")
    ap.add_argument("--maxnreg", type=int, help="default: the launcher's default_maxnreg")
    ap.add_argument("--gluon", action="store_true", help="the Gluon kernel (kvtuner.kernels.gluon_decode) instead")
    ap.add_argument("--per-row", action="store_true", help="the ragged-batch variant (a table of rows)")
    ap.add_argument("--prefetch", type=int, default=0, help="with --gluon: L2 prefetch this many blocks ahead")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90, D={D}, {R} query heads a KV head, groups of {G}")
    for k_bits, v_bits, codebook in args.kv:
        name = f"K{k_bits}V{v_bits}{'+nuq' if codebook else ''}"
        if args.gluon:
            from kvtuner.kernels.gluon_decode import BLOCK, compile_sm90

            kernel, warps, tokens = compile_sm90(k_bits, v_bits, D, R, G, G, prefetch=args.prefetch), 1, max(BLOCK, G)
        else:
            warps = args.warps or decode.default_num_warps(k_bits, v_bits)
            kernel, step_tokens = compile_kernel(k_bits, v_bits, warps, args.maxnreg or decode.default_maxnreg(warps),
                                                 codebook=codebook, per_row=args.per_row)
            tokens = step_tokens // warps  # one slice of the step a warp
        c = loop_census(kernel, tokens)
        ops = {k: v for k, v in c.items() if k.isupper() and v}
        print(f"\n{name}{' (gluon)' if args.gluon else ''}: {warps} warps, {c['registers']} registers, {c['stack']} B "
              f"stack; loop {c['loop']} instructions ({c['skipped']} in blocks most steps skip): "
              f"{c['loop'] - c['skipped']} a warp-step of {tokens} tokens, {c['per_token']:.1f} a token")
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:24]))
        widths = collections.Counter(re.search(r"LDG\S*", t).group(0) for t in hot_loop(disassemble(kernel)[1])[0]
                                     if "LDG" in t)
        print("  global loads: " + ", ".join(f"{k} {v}" for k, v in sorted(widths.items())))


if __name__ == "__main__":
    main()
