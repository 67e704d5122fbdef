"""Compile the packed decode kernel for sm_90 without a GPU and count the SASS instructions of its history loop.

The kernel is bound by instruction issue, so the count a warp issues per cached token is the number to
watch between device runs: its floor time is tokens x count / (4 schedulers x SMs x clock). Compiles
the Llama-3.1-8B attention shape (D 128, 4 query heads a KV head, groups of 32) with the launcher's own
defaults (``default_num_warps``, ``default_maxnreg``), the stride specializations a real launch
gets, and Triton's bundled ``cuobjdump``. Needs triton (the device has 3.6; counts differ across versions).

    PYTHONPATH=src python benchmarks/sass_decode.py K4V4 K2V2 [--warps 2] [--maxnreg 200] [--per-row]
    # triton 3.6, the device's (--stages: default the launcher's, 2 for 2- and 4-bit sides; 0 loads into registers)
    PYTHONPATH=.venv/gluon-triton:src python benchmarks/sass_decode.py --gluon K4V4 K2V2 [--prefetch 2] [--stages 0]
"""

from __future__ import annotations

import argparse
import collections
import re

import triton

from kvtuner.kernels import decode
from kvtuner.kernels.sass import disassemble, hot_loop, loop_census

D, R, G = 128, 4, 32
BITS = (2, 3, 4, 8)  # what the kernel decodes


def bit_pair(text: str) -> tuple[int, int, bool]:
    """``KxVy`` or ``KxVy+nuq`` (codes indexing level tables): (x, y, codebook)."""
    match = re.fullmatch(r"K(\d)V(\d)(\+nuq)?", text)
    if not match or {int(match[1]), int(match[2])} - set(BITS) or (match[3] and max(int(match[1]), int(match[2])) > 4):
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit pair KxVy[+nuq] with x, y in {BITS} (<= 4 with +nuq)")
    return int(match[1]), int(match[2]), bool(match[3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kv", nargs="+", type=bit_pair, help="bit pairs such as K4V4 or K4V4+nuq")
    ap.add_argument("--warps", type=int, choices=(1, 2, 4, 8), help="default: the launcher's default_num_warps")
    ap.add_argument("--maxnreg", type=int, help="default: the launcher's default_maxnreg")
    ap.add_argument("--gluon", action="store_true", help="the Gluon kernel (kvtuner.kernels.gluon_decode) instead")
    ap.add_argument("--per-row", action="store_true", help="the ragged-batch variant (a table of rows)")
    ap.add_argument("--prefetch", type=int, default=0, help="with --gluon: L2 prefetch this many blocks ahead")
    ap.add_argument("--stages", type=int, help="with --gluon: a ring of this many shared-memory buffers (default: "
                    "the launcher's default_stages)")
    args = ap.parse_args()
    if args.prefetch < 0 or (args.prefetch and not args.gluon):
        ap.error("--prefetch takes a number of blocks >= 0, with --gluon")
    if args.stages is not None and (args.stages < 0 or not args.gluon or (args.stages and args.prefetch)):
        ap.error("--stages takes a number of buffers >= 0, with --gluon, and a prefetch only without stages")
    print(f"triton {triton.__version__}, sm_90, D={D}, {R} query heads a KV head, groups of {G}")
    for k_bits, v_bits, codebook in args.kv:
        name = f"K{k_bits}V{v_bits}{'+nuq' if codebook else ''}"
        if args.gluon:
            from kvtuner.kernels.gluon_decode import BLOCK, compile_sm90

            kernel, warps, tokens = compile_sm90(k_bits, v_bits, D, R, G, G, prefetch=args.prefetch,
                                                   stages=args.stages), 1, max(BLOCK, G)
        else:
            warps = args.warps or decode.default_num_warps(k_bits, v_bits)
            kernel, step_tokens = decode.compile_sm90(k_bits, v_bits, D, R, G, warps,
                                                      args.maxnreg or "auto",
                                                      codebook=codebook, per_row=args.per_row)
            tokens = step_tokens // warps  # one slice of the step a warp
        c = loop_census(kernel, tokens)
        ops = {k: v for k, v in c.items() if k.isupper() and v}
        print(f"\n{name}{' (gluon)' if args.gluon else ''}: {warps} warps, {c['registers']} registers, {c['stack']} B "
              f"stack; loop {c['loop']} instructions ({c['skipped']} in blocks most steps skip): "
              f"{c['loop'] - c['skipped']} a warp-step of {tokens} tokens, {c['per_token']:.1f} a token")
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:24]))
        loop = hot_loop(disassemble(kernel)[1])[0]
        for kind, op in (("global loads", r"LDG(?!STS|DEPBAR)\S*"), ("async copies", r"LDGSTS\S*"),
                         ("shared loads", r"LDS\S*")):
            widths = collections.Counter(re.search(op, t).group(0) for t in loop if re.search(op, t))
            if widths:
                print(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(widths.items())))


if __name__ == "__main__":
    main()
