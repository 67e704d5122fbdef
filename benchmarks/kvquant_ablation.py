"""KVQuant's ideas, one at a time, on packed storage: the ablation of issue 12.

For each bit width B (default 3 and 2), K and V both at B bits: uniform KIVI -> + attention sink
-> + pre-RoPE keys -> + NUQ levels -> + 1% dense-and-sparse, then further compositions, beside
uniform KIVI K4V4. Every row is scored by the chunked, decode-faithful ``Evaluator`` against
the full-precision cache on WikiText-2 test windows that no calibration saw, with effective bits
from the cache's real stored bytes (codes, scales, zeros, outliers, sink tokens, level tables).

Calibration (levels, thresholds): ``--calib-windows`` windows of each ``--calib`` source (window 1,
a search's validation window, skipped), fitted once for every row that needs it
(``kvtuner.profile.calibrate``), written beside the results.

    python benchmarks/kvquant_ablation.py --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from kvtuner.config import KVConfig, KVConfigError, parse_label, write_atomic
from kvtuner.evaluate import Evaluator, token_windows
from kvtuner.models import load_model
from kvtuner.profile import calibration_data
from kvtuner.profile.calibrate import calibrate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LADDER = ("KV{b}", "KV{b}+sink1", "KV{b}+sink1+prerope", "KV{b}+sink1+prerope+nuq", "KV{b}+sink1+prerope+nuq+ds1")


def rows_for(bits: list[int], extra: list[str], ladder: bool = True) -> list[str]:
    rows = ["KV4"]
    for b in bits:
        rows += [r.format(b=b) for r in (*LADDER, *extra)] if ladder else [r.format(b=b) for r in extra]
    return list(dict.fromkeys(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="3,2", help="bit widths of the ladder")
    parser.add_argument("--extra", default="KV{b}+sink1+prerope+ds1,kvquant:KV{b}+sink1+prerope+nuq,"
                                           "kvquant:KV{b}+sink1+prerope+nuq+ds1,kvquant:KV{b}+sink1+prerope+nuq+ds1.5",
                        help="more rows per bit width ({b} is the width)")
    parser.add_argument("--no-ladder", action="store_true", help="only KV4 and the --extra rows")
    parser.add_argument("--eval-data", type=Path, default=DATA / "wikitext2_raw_test.txt")
    parser.add_argument("--eval-skip", type=int, default=4, help="windows of --tokens skipped before the evaluation")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--calib", default=f"{DATA / 'wikitext2_raw_test.txt'},{DATA / 'gsm8k_train.jsonl'}",
                        help="calibration sources (window 0 of each), comma-separated; 'generated': the model's own text")
    parser.add_argument("--calib-windows", type=int, default=3,
                        help="windows of each file source (never more than --eval-skip - 1 of the evaluation file)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]
    labels = rows_for(bits, [e for e in args.extra.split(",") if e], ladder=not args.no_ladder)
    try:
        specs = [parse_label(label) for label in labels]
    except KVConfigError as e:
        parser.error(str(e))
    if args.eval_skip < 2:
        parser.error("--eval-skip must be at least 2: windows 0 and 1 of the evaluation file calibrate and validate")
    if not 1 <= args.calib_windows <= args.eval_skip - 1:
        parser.error(f"--calib-windows must be in 1..{args.eval_skip - 1} (disjoint from the evaluation windows)")
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model("default")
    layers = model.config.num_hidden_layers
    calib = calibration_data(model, tokenizer, args.tokens, args.calib.split(","), cache_dir=args.out, progress=True)
    windows = calib.calibration
    if args.calib_windows > 1:  # more windows of each file source (window 1 is the search's validation: skipped)
        more = [token_windows(Path(source), tokenizer, args.tokens, count=args.calib_windows - 1, skip_windows=2)
                for source in calib.source.split(", ") if Path(source).suffix in (".txt", ".jsonl")]
        windows = torch.cat([windows, *more])
    t0 = time.perf_counter()
    fitted = calibrate(model, windows, specs, progress=True, meta={"data": calib.describe(), "windows": windows.shape[0]})
    calibration_seconds = time.perf_counter() - t0
    fitted.save(args.out / "calibration.json")

    eval_ids = token_windows(args.eval_data, tokenizer, args.tokens, count=args.eval_windows, skip_windows=args.eval_skip)
    evaluator = Evaluator(model, eval_ids, calibration=fitted)
    results = []
    print(f"\nfull-precision ppl {evaluator.reference_ppl():.3f} on {eval_ids.numel()} tokens "
          f"(windows {args.eval_skip}..{args.eval_skip + args.eval_windows - 1} of {args.tokens} of {args.eval_data.name})")
    print(f"calibration: {calib.source} ({windows.shape[0]} x {args.tokens} tokens, {calibration_seconds:.0f} s)\n")
    header = f"| {'config':<34} | {'ppl':>7} | {'KL':>8} | {'top-1':>6} | {'bits':>5} | {'effective bits':>14} |"
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, spec in zip(labels, specs):
        r = evaluator.evaluate(KVConfig([spec] * layers, name=label))
        results.append(r.to_dict())
        print(f"| {label:<34} | {r.ppl:7.3f} | {r.kl:8.5f} | {r.top1:6.4f} | {r.avg_bits:5.2f} | {r.effective_bits:14.3f} |",
              flush=True)
    run = {"reference_ppl": evaluator.reference_ppl(), "tokens": eval_ids.numel(), "eval_data": str(args.eval_data),
           "eval_windows": [args.eval_skip, args.eval_skip + args.eval_windows - 1], "window_tokens": args.tokens,
           "calibration": calib.describe(), "calibration_seconds": calibration_seconds, "rows": results,
           "torch": torch.__version__, "threads": args.threads, "argv": sys.argv[1:]}
    write_atomic(args.out / "ablation.json", json.dumps(run, indent=1) + "\n")
    print(f"\nwritten: {args.out / 'ablation.json'}, {args.out / 'calibration.json'} (pid {os.getpid()})")


if __name__ == "__main__":
    main()
