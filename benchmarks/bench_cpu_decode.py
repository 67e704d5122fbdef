"""CPU decode speed and peak memory after a long prompt: transformers' caches against kvtuner's.

What a user of ``kvtuner generate`` on a CPU gets: the default model in fp32, a prompt of
``--prompts`` tokens of WikiText-2 prefilled in one call, then ``--new-tokens`` greedy one-token
steps, timed apart from the prefill. Baselines: ``DynamicCache`` (``generate``'s default: it
concatenates every layer's keys and values at each step) and ``StaticCache`` (preallocated for the
prompt and the new tokens: no concatenation, attention over the whole reserved length). kvtuner's
caches decode through ``use_packed_attention``: ``auto`` is the C++ kernel (:mod:`kvtuner.kernels.native`),
``-torch`` rows force the tiled torch path (:mod:`kvtuner.kernels.streaming`, the default before it).
Each case runs in its own process, so ``peak_rss_mib`` is that case's own high-water mark (prefill
included, where the model's activations dominate); ``decode_peak_rss_mib`` is the high-water mark of the
decode steps alone (Linux: freed memory handed back with ``malloc_trim`` and the mark reset through
``/proc/self/clear_refs`` after the prefill), where the cache is what differs; ``kv_mib`` is the cache's
stored bytes at the end.

    PYTHONPATH=src python benchmarks/bench_cpu_decode.py --prompts 2048 8000 --threads 1 2 --out runs/cpu_decode
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw_test.txt"
CASES = ["DynamicCache", "StaticCache", "KV8", "K4V4", "K2V2", "K4V4-torch"]


@torch.no_grad()
def run_case(case: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    from kvtuner.cache import MixedPrecisionCache, cache_kwargs
    from kvtuner.cache.attention import use_packed_attention
    from kvtuner.config import KVConfig
    from kvtuner.evaluate import token_windows
    from kvtuner.models import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model("default")
    prompt = token_windows(DATA, tokenizer, prompt_tokens, 1)
    kv, _, backend = case.partition("-")
    if kv == "DynamicCache":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    elif kv == "StaticCache":
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens)
    else:
        cache = MixedPrecisionCache(KVConfig.uniform(kv, model.config.num_hidden_layers), model.config)
    kwargs = cache_kwargs(model, cache)
    with contextlib.nullcontext() if kv.endswith("Cache") else use_packed_attention(model, cache, backend=backend or "auto"):
        t0 = time.perf_counter()
        token = model(prompt, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1:].argmax(-1)  # as generate does
        t1 = time.perf_counter()
        reset_peak_rss()
        for _ in range(new_tokens):
            token = model(token, use_cache=True, **kwargs).logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    if kv.endswith("Cache"):
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    else:
        kv_bytes = cache.nbytes()
    return {"case": case, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads,
            "prefill_s": t1 - t0, "decode_tok_s": new_tokens / (t2 - t1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "decode_peak_rss_mib": status_mib("VmHWM"), "kv_mib": kv_bytes / 2**20}


def reset_peak_rss() -> None:
    """Return freed heap memory to the OS and restart the process's peak-RSS mark (``VmHWM``) from now (Linux with
    glibc; elsewhere ``decode_peak_rss_mib`` is the whole run's peak)."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def status_mib(field: str) -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = next(line for line in status.read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[2048, 8000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/cpu_decode"))
    ap.add_argument("--child", nargs=4, metavar=("CASE", "PROMPT", "NEW", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        case, prompt, new, threads = args.child
        print(json.dumps(run_case(case, int(prompt), int(new), int(threads))))
        return
    if not DATA.exists():
        ap.error(f"{DATA} is missing (see ../shared/data/SOURCES.md)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for threads in args.threads:
        for prompt in args.prompts:
            for case in args.cases:
                done = subprocess.run([sys.executable, __file__, "--child", case, str(prompt), str(args.new_tokens),
                                       str(threads)], capture_output=True, text=True)
                if done.returncode:
                    print(f"{case} {prompt} tokens, {threads} threads failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"threads {threads} prompt {prompt:5d} {case:12} decode {r['decode_tok_s']:6.2f} tok/s  "
                      f"prefill {r['prefill_s']:6.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  decode peak "
                      f"{r['decode_peak_rss_mib']:7.0f} MiB  KV {r['kv_mib']:6.1f} MiB",
                      flush=True)
                (args.out / "cpu_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
