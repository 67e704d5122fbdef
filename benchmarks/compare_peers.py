"""kvtuner against other KV-cache quantizers on one GGUF model and the same tokens (issue 6).

Engines, each scored against its *own* full-precision KV on the same token ids:

* kvtuner: uniform KIVI pairs, per-token K4V4, fp8, and searched configs (``config_<budget>.json``);
* llama.cpp (llama-cpp-python): the KV cache types f16 ... iq4_nl and two mixed K/V pairs;
* transformers ``QuantizedCache``: quanto and HQQ at 2 and 4 bits, and its per-tensor fp8 backend.

Metrics: perplexity, KL(P_fp || P_q) per token and top-1 agreement; bits: nominal and effective
(real bytes). Each peer is optional: a missing package is skipped with its reason. Outputs,
written at the end and atomically: ``table.json``, ``table.md``, ``run.json`` (with versions,
notes and speed) and ``pareto.png`` under ``--out``. See ``benchmarks/peers/`` for how each
engine is run and why its evaluation is decode-faithful.

    python benchmarks/compare_peers.py --windows 2 --out runs/compare
"""

from __future__ import annotations

import argparse
import hashlib
import os
import importlib.metadata
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvtuner.cache import MixedPrecisionCache
from kvtuner.config import KVConfig
from kvtuner.evaluate import Evaluator, token_windows
from kvtuner.models import DEFAULT_MODEL, default_gguf_path, load_model
from peers import hf_caches, llamacpp
from peers.common import PeerUnavailable, Report, Row, markdown_table, verdict
from peers.speed import hf_generation_speed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext2_raw_test.txt"
ENGINES = ("kvtuner", "llama.cpp", "quanto", "hqq", "transformers-fp8")
KIVI_PAIRS = ("KV8", "K8V4", "K4V4", "K4V2", "K2V2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF file, or 'default' (SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text file to take the windows from")
    p.add_argument("--windows", type=int, default=4, help="disjoint windows to score")
    p.add_argument("--skip-windows", type=int, default=4,
                   help="windows to skip first, so the scored tokens are disjoint from a search's calibration and "
                        "validation windows (kvtuner search uses the file's first 2 x 2048 tokens)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument("--configs", type=Path, default=Path("runs/demo"), help="folder with searched config_<budget>.json")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="also time CPU generation")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="speed: prompt length")
    p.add_argument("--new-tokens", type=int, default=256, help="speed: tokens generated")
    p.add_argument("--llama-ubatch", type=int, default=None,
                   help="llama.cpp n_ubatch for every row (default: 1 for f16/f32 caches, the whole window for quantized ones)")
    p.add_argument("--llama-threads", type=int, default=1, help="llama.cpp threads for the quality runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, and llama.cpp's in the speed runs (1: on a shared 2-core machine, OpenMP "
                        "spin-waits made 2 threads ~10x slower than 1)")
    p.add_argument("--reuse", type=Path, default=None,
                   help="run.json of an earlier run on the same model, data and windows: keep its rows (and speed, "
                        "with --no-speed) for the engines not in --engines, e.g. to add new searched configs cheaply")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        p.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    return args


def kvtuner_configs(num_layers: int, configs_dir: Path, notes: list[str]) -> list[KVConfig]:
    configs = [KVConfig.uniform(kv, num_layers) for kv in KIVI_PAIRS]
    # The same bytes as llama.cpp's q4_0/iq4_nl (4.5 bits): one fp16 scale and zero per 64 values instead of 32.
    g64 = KVConfig.uniform("K4V4", num_layers, group_size=64, residual_length=64)
    g64.name = "K4V4 g64"
    configs.append(g64)
    configs.append(KVConfig.uniform("K4V4", num_layers, method="per_token"))
    configs.append(KVConfig.uniform("KV8", num_layers, method="fp8"))
    searched = sorted(configs_dir.glob("config_*.json"), key=lambda p: _budget(p))
    if not searched:
        notes.append(f"no searched configs in {configs_dir} (run `kvtuner search --out {configs_dir}`); kvtuner shows uniform configs only")
    for path in searched:
        cfg = KVConfig.load(path)
        cfg.name = f"searched@{_budget(path):g}"
        configs.append(cfg)
    return configs


def _budget(path: Path) -> float:
    try:
        return float(path.stem.removeprefix("config_"))
    except ValueError:
        return float("inf")


def attempt(what: str, fn: Callable, notes: list[str]):
    """Run one engine step; a missing peer or a failure becomes a printed note instead of ending the run."""
    try:
        return fn()
    except PeerUnavailable as e:
        msg = f"skipped {e}"
    except Exception as e:  # one broken peer must not lose the others' results
        traceback.print_exc()
        msg = f"{what} failed: {type(e).__name__}: {e}"
    print(msg, file=sys.stderr)
    notes.append(msg)
    return None


def available(check: Callable[[], None], notes: list[str]) -> bool:
    """Whether a peer can run; if not, its reason is printed and noted."""
    try:
        check()
    except PeerUnavailable as e:
        print(f"skipped {e}", file=sys.stderr)
        notes.append(f"skipped {e}")
        return False
    return True


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "kvtuner", "llama_cpp_python", "optimum-quanto", "hqq", "gguf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engines = args.engines.split(",")
    progress = not args.no_progress
    torch.set_num_threads(args.threads)
    report = Report()
    notes = report.notes
    t_start = time.perf_counter()

    gguf_path = default_gguf_path() if args.model == DEFAULT_MODEL else Path(args.model)
    print(f"model: {gguf_path}")
    model, tokenizer = load_model(args.model)
    windows = token_windows(args.data, tokenizer, args.window, args.windows, skip_windows=args.skip_windows)
    print(f"data: {args.data} -> {args.windows} windows x {args.window} tokens after skipping {args.skip_windows}")
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    report.meta = {
        "model": str(gguf_path), "data": str(args.data),
        "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
        "windows": args.windows, "window": args.window, "skip_windows": args.skip_windows, "versions": versions(),
        "threads": torch.get_num_threads(), "engines": engines, "loadavg_at_start": os.getloadavg(),
    }

    rows: list[Row] = report.rows
    hf_engines = [e for e in engines if e in ("kvtuner", "quanto", "hqq", "transformers-fp8")]
    if hf_engines:
        evaluator = Evaluator(model, windows)
        report.reference_ppl["transformers (fp32 KV)"] = evaluator.reference_ppl()
    if "kvtuner" in engines:
        configs = kvtuner_configs(num_layers, args.configs, notes)
        for cfg in tqdm(configs, desc="kvtuner", disable=not progress, unit="config"):
            res = attempt(f"kvtuner {cfg.name}", lambda: evaluator.evaluate(cfg), notes)
            if res is not None:
                rows.append(Row("kvtuner", cfg.name, round(cfg.avg_bits, 4), round(res.effective_bits, 4), res.ppl,
                                res.kl, res.top1, res.tokens, note=f"chunk {res.chunk_size}; real packed bytes"))
    for engine, backend in (("quanto", "quanto"), ("hqq", "hqq"), ("transformers-fp8", "fp8")):
        if engine not in engines or not available(lambda: hf_caches.check_available(backend), notes):
            continue
        specs = list(hf_caches.specs([backend]))
        for spec in tqdm(specs, desc=engine, disable=not progress, unit="config"):
            row = attempt(f"{engine} {spec.label}", lambda: hf_caches.evaluate(evaluator, spec), notes)
            if row is not None:
                rows.append(row)
    if hf_engines:
        del evaluator  # its reference log-probs are the largest thing held

    runner = None
    if "llama.cpp" in engines and available(lambda: llamacpp.check_available(gguf_path), notes):
        runner = llamacpp.LlamaCppRunner(gguf_path, args.window, args.llama_ubatch, args.llama_threads)
        out = attempt("llama.cpp", lambda: runner.evaluate(windows, progress=progress), notes)
        if out is not None:
            llama_rows, facts = out
            rows.extend(llama_rows)
            report.reference_ppl[f"llama.cpp ({facts['reference']} KV)"] = facts["reference_ppl"]
            report.meta["llama.cpp"] = facts
            if "noise_floor_kl" in facts:
                notes.append(
                    f"llama.cpp noise floor: its own {facts['reference']} KV run as one batched ubatch vs token by token "
                    f"differs by KL {facts['noise_floor_kl']:.2e} (another flash-attention path, nothing quantized)"
                )

    if args.speed:
        report.speed = run_speed(args, model, tokenizer, engines, rows, runner, num_layers, notes, progress)
    if args.reuse:
        reuse(args.reuse, report, engines, keep_speed=not args.speed)
        rows.sort(key=lambda r: ENGINES.index(r.engine) if r.engine in ENGINES else len(ENGINES))

    print()
    print(open_table(report))
    written = report.write(args.out, f"{gguf_path.name}: {args.windows} x {args.window} tokens of {args.data.name}")
    print(f"\nwrote {', '.join(str(p) for p in written)} in {time.perf_counter() - t_start:.0f} s")
    return 0


def reuse(path: Path, report: Report, engines: list[str], keep_speed: bool) -> None:
    """Carry an earlier run's results for the engines not run now; refuse a run on other tokens."""
    old = json.loads(path.read_text())
    for key in ("model", "data_sha256", "windows", "window", "skip_windows"):
        if old.get(key) != report.meta[key]:
            raise SystemExit(f"error: --reuse {path}: its {key} is {old.get(key)!r}, this run's is {report.meta[key]!r}")
    carried = [Row(**r) for r in old["rows"] if r["engine"] not in engines]
    report.rows.extend(carried)
    for name, ppl in old.get("reference_ppl", {}).items():
        report.reference_ppl.setdefault(name, ppl)
    carried_engines = {r.engine for r in carried}
    report.notes.extend(n for n in old.get("notes", []) if any(n.startswith(e) or f" {e}" in n for e in carried_engines))
    if "llama.cpp" in carried_engines and "llama.cpp" in old:
        report.meta["llama.cpp"] = old["llama.cpp"]
    if keep_speed:
        report.speed = old.get("speed", [])
    report.meta["reused"] = {"from": str(path), "engines": sorted(carried_engines)}
    report.notes.append(f"rows of {', '.join(sorted(carried_engines))} reused from {path} (same model, data and windows)")


def run_speed(args, model, tokenizer, engines, rows, runner, num_layers, notes, progress) -> list[dict]:
    from transformers import DynamicCache

    prompt = token_windows(args.data, tokenizer, args.prompt_tokens, 1)
    cases: list[tuple[str, str, Callable]] = [("transformers", "full precision (DynamicCache)", DynamicCache)]
    if "kvtuner" in engines:
        kv4 = KVConfig.uniform("KV4", num_layers)
        cases.append(("kvtuner", "KIVI KV4 g32 r32", lambda: MixedPrecisionCache(kv4, model.config)))
    if any(r.engine == "quanto" for r in rows):
        spec = hf_caches.HFCacheSpec("quanto", 4)
        cases.append(("quanto", spec.label, lambda: spec.make_cache(model.config)))
    results = []
    for engine, name, make in tqdm(cases, desc="speed", disable=not progress, unit="cache"):
        r = attempt(f"speed {engine}", lambda: hf_generation_speed(model, prompt, make, args.new_tokens, engine, name), notes)
        if r is not None:
            results.append({**r, "loadavg_1m": os.getloadavg()[0]})
    if runner is not None:
        for kv in ("f16", "q4_0"):
            r = attempt(f"speed llama.cpp {kv}", lambda: runner.generation_speed(kv, kv, prompt[0].tolist(), args.new_tokens,
                                                                               torch.get_num_threads()), notes)
            if r is not None:
                results.append({**r, "loadavg_1m": os.getloadavg()[0]})
    return results


def open_table(report: Report) -> str:
    lines = [markdown_table(report.rows, report.reference_ppl)]
    lines += ["Verdict:", *[f"  {v}" for v in verdict(report.rows)]]
    lines += [f"speed: {s['engine']:<13} {s['cache']:<32} prefill {s['prefill_s']:6.2f} s  decode {s['decode_tok_s']:6.2f} tok/s"
              for s in report.speed]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
