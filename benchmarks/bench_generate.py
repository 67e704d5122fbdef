"""End-to-end decode throughput of a Llama-3.1-8B-shaped model: fixed batches and the largest that fits.

``LlamaForCausalLM`` with the Llama-3.1-8B shape (32 layers, hidden 4096, 32 q / 8 KV heads,
vocab 128256) and random bf16 weights: decode throughput does not depend on weight values.
Prefill is skipped: each cache is filled directly with random K/V of the right shape (packed by
the Triton quantizer for kvtuner, by quanto for quanto), then greedy decode steps are timed
(HF forward; kvtuner steps cross one residual flush every 32 steps).

Caches, each what a user would run:

* ``fp16``: transformers' default ``DynamicCache`` + SDPA (concatenates every layer every step);
* ``static``: bf16 ``StaticCache`` (preallocated, written in place), eager, and with ``--graph`` also as
  CUDA-graph replays of the whole decode step at batches up to 16 (what ``torch.compile``'s
  "reduce-overhead" mode records; graphs need no compiler, so no compile time enters);
* kvtuner ``K8V8``, ``K4V4`` and ``mixed3.25`` (K4V2 on 24 layers, K4V4 on the first and last 4:
  3.25 bits on average) through ``use_packed_attention`` (``--backend``, default ``auto``: the Gluon
  kernel where it is the faster, else Triton's), and with ``--graph`` through
  :class:`~kvtuner.cache.graphs.GraphedDecoder` (the Triton kernel with device-side lengths);
* ``quanto``: transformers' ``QuantizedCache`` with quanto (4 bits, its defaults), with its CUDA extension
  (``--quanto-ext``: built once with nvcc, the build time printed) or else its torch unpack.

Batches: ``--batches`` (integers, and ``max``: estimated from free memory and each layout's bytes per
token, cut by 15% on out-of-memory). ``--gluon-stages 0 2`` runs kvtuner's eager rows once per number of the
Gluon kernel's shared-memory stages (labelled ``K4V4@s0``, ...; graphs run the Triton kernel, once): an A/B of
the kernel in one run on one machine, where eager steps vary more between machines than the kernel saves.

    PYTHONPATH=src:benchmarks python benchmarks/bench_generate.py --graph --quanto-ext --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache, StaticCache

from bench_attention import gpu_name
from kvtuner import KVConfig, LayerSpec, MixedPrecisionCache
from kvtuner.cache import cache_kwargs
from kvtuner.cache.attention import use_packed_attention
from kvtuner.cache.graphs import GraphedDecoder
from kvtuner.config import write_atomic
from kvtuner.kernels import BACKENDS, gluon_decode, quantize
from kvtuner.method import StoredKV, StoredSide

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rope_theta=500000.0, attn_implementation="sdpa")
N_LAYERS, H_KV, D = 32, 8, 128
FP16_TOKEN = N_LAYERS * H_KV * D * 2 * 2  # bytes a token takes in a bf16 cache, K and V


def kv_config(name: str) -> KVConfig:
    if name == "mixed3.25":
        edge = LayerSpec("kivi", 4, 4, 32, 32)
        return KVConfig([edge] * 4 + [LayerSpec("kivi", 4, 2, 32, 32)] * 24 + [edge] * 4, name=name)
    return KVConfig.uniform(name, N_LAYERS, group_size=32, residual_length=32)


def token_bytes(name: str) -> float:
    """Stored bytes per token per sequence, plus one layer's transient copy (cat on append or flush)."""
    if name == "fp16":
        return FP16_TOKEN * (1 + 2 / N_LAYERS)
    if name == "static":
        return FP16_TOKEN
    if name == "quanto":  # 4-bit codes + bf16 scale and shift per 64, then a dequantized layer and its cat
        return FP16_TOKEN * (0.5625 / 2 + 4 / N_LAYERS)
    per_layer = [H_KV * (D * (s.k_bits + s.v_bits) // 8 + 2 * (D // s.group_size) * 2 * 2) for s in kv_config(name).layers]
    return sum(per_layer) + max(per_layer)


def make_cache(name: str, model, max_cache_len: int):
    if name == "fp16":
        return DynamicCache()
    if name == "static":
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    if name == "quanto":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    return MixedPrecisionCache(kv_config(name), model.config)


def fill(cache, batch: int, context: int) -> None:
    """Give every layer ``context`` random tokens of history, built in slices of the batch."""
    chunk = max(1, 2**31 // (H_KV * context * D * 2))

    def rand(b):
        return torch.randn(b, H_KV, context, D, device="cuda", dtype=torch.bfloat16)

    for i in range(N_LAYERS):  # by index: a DynamicCache creates its layers on first update
        if isinstance(cache, MixedPrecisionCache):
            layer = cache.layers[i]
            parts = []
            for start in range(0, batch, chunk):
                b = min(chunk, batch - start)
                parts.append((quantize(rand(b), layer.method.key_spec), quantize(rand(b), layer.method.value_spec)))
            empty = torch.empty(batch, H_KV, 0, D, device="cuda", dtype=torch.bfloat16)
            layer.lazy_initialization(empty, empty)
            layer.history = StoredKV(StoredSide(batch_cat([p[0] for p in parts])), StoredSide(batch_cat([p[1] for p in parts])))
            layer.cumulative_length = context
        else:  # DynamicCache, StaticCache and quanto: their own update stores (quanto: quantizes) the first call
            cache.update(rand(batch), rand(batch), i)


def batch_cat(parts):
    if len(parts) == 1:
        return parts[0]
    shape = torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    stored = [torch.cat(ts, dim=0) for ts in zip(*[p.stored_tensors() for p in parts])]
    return type(parts[0])(stored[0], stored[1], stored[2], parts[0].spec, shape)


@torch.no_grad()
def decode(model, cache, batch: int, steps: int, warmup: int, graph: bool, backend: str) -> float:
    """Seconds a greedy one-token step takes (median-free mean over ``steps``, after ``warmup`` steps); ``graph``:
    the step (forward, argmax, feeding the token back) recorded once as a CUDA graph and replayed."""
    kw = cache_kwargs(model, cache)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")

    def step():
        tokens.copy_(model(input_ids=tokens, logits_to_keep=1, **kw).logits[:, -1].argmax(-1, keepdim=True))

    if graph and isinstance(cache, MixedPrecisionCache):  # its decoder records (and replays) the graphs itself
        with GraphedDecoder(model, cache, cache.get_seq_length() + warmup + steps + 1, backend) as graphed:
            for _ in range(warmup):
                tokens.copy_(graphed(tokens).argmax(-1, keepdim=True))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                tokens.copy_(graphed(tokens).argmax(-1, keepdim=True))
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / steps
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        recorded = torch.cuda.CUDAGraph()
        with torch.cuda.graph(recorded):
            step()
        step = recorded.replay
    else:
        for _ in range(warmup):
            step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run_one(model, name: str, context: int, batch: int, steps: int, warmup: int, graph: bool, backend: str) -> dict:
    cache = make_cache(name, model, context + steps + warmup + 1)
    torch.cuda.reset_peak_memory_stats()
    fill(cache, batch, context)
    if isinstance(cache, MixedPrecisionCache) and not graph:
        with use_packed_attention(model, cache, backend=backend):
            seconds = decode(model, cache, batch, steps, warmup, graph, backend)
    else:
        seconds = decode(model, cache, batch, steps, warmup, graph, backend)
    return dict(kv="quanto:K4V4" if name == "quanto" else name, batch=batch, context=context, graph=graph,
                tokens_per_s=batch / seconds, ms_per_step=1e3 * seconds,
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)


@functools.cache
def build_quanto_extension() -> None:
    """Build and load quanto's CUDA extension (nvcc through torch's cpp_extension, minutes) once, saying how long it took."""
    from optimum.quanto.library.extensions import get_extension

    t0 = time.perf_counter()
    get_extension("quanto_cuda").lib
    print(f"quanto's CUDA extension built and loaded in {time.perf_counter() - t0:.0f} s", flush=True)


def run_fitting(model, name: str, context: int, batch: int, steps: int, graph: bool, backend: str,
                shrink: bool, stages: int | None = None) -> tuple[dict | None, int]:
    """(``run_one``'s row, the batch it ran at): on out-of-memory 15% smaller with ``shrink`` (the largest batch that
    fits), else skipped (None). ``stages``: the Gluon kernel's shared-memory stages forced (:func:`gluon_stages`),
    the row labelled ``name@sN``."""
    label = name if stages is None else f"{name}@s{stages}"
    while batch >= 1:
        try:
            t0 = time.time()
            with gluon_stages(stages):
                r = run_one(model, name, context, batch, steps, GRAPH_WARMUP if graph else 2, graph, backend)
            if stages is not None:
                r["kv"] = label
            print(f"{label + ' graph' * graph:12} T={context:6} B={batch:4} {r['tokens_per_s']:9.1f} tok/s "
                  f"{r['ms_per_step']:7.2f} ms/step peak {r['peak_mem_gib']:5.1f} GiB ({time.time() - t0:.0f}s)", flush=True)
            return r, batch
        except torch.OutOfMemoryError:
            print(f"{label:12} T={context:6} B={batch:4} out of memory, {'retrying smaller' if shrink else 'skipped'}",
                  flush=True)
            if not shrink:
                return None, batch
            batch = int(batch * 0.85)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    return None, batch


GRAPHED = ("static", "K8V8", "K4V4", "mixed3.25")  # caches whose decode step CUDA graphs can record
GRAPH_WARMUP = 65  # eager steps before timing graphs: two flushes, so that kvtuner's flushing step is recorded too


def gluon_stages(stages: int | None):
    """The Gluon kernel run with ``stages`` shared-memory stages wherever it takes its default (None: unchanged):
    the cache's decode path passes no stages, so the default is what to set."""
    if stages is None:
        return contextlib.nullcontext()
    return mock.patch.object(gluon_decode, "default_stages", lambda k_bits, v_bits: stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--kv", nargs="+", default=["fp16", "static", "K8V8", "K4V4", "mixed3.25", "quanto"])
    ap.add_argument("--batches", nargs="+", default=["1", "16", "max"], help="batch sizes, and max: the largest that fits")
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays of the step at batches <= 16 "
                    f"(caches: {', '.join(GRAPHED)})")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="kvtuner's decode kernel")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--reserve-gib", type=float, default=8.0, help="memory kept free for activations and logits")
    ap.add_argument("--quanto-ext", action="store_true", help="use quanto's JIT-built CUDA extension (else torch unpack)")
    ap.add_argument("--gluon-stages", type=int, nargs="+", help="kvtuner's eager rows once per number of the Gluon "
                    "kernel's shared-memory stages (0: loading into registers); default: the kernel's default_stages")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if any(b != "max" and not (b.isdigit() and int(b) > 0) for b in args.batches):
        ap.error(f"--batches takes positive integers and max, not {' '.join(args.batches)}")
    for name in set(args.kv) - {"fp16", "static", "quanto"}:
        try:
            kv_config(name)
        except ValueError as err:
            ap.error(f"--kv {name}: {err}")
    if args.gluon_stages and min(args.gluon_stages) < 0:
        ap.error(f"--gluon-stages takes numbers of stages >= 0, not {' '.join(map(str, args.gluon_stages))}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")

    if "quanto" in args.kv and not args.quanto_ext:
        from bench_attention import use_quanto_torch_unpack

        use_quanto_torch_unpack()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B)).eval()
    torch.set_default_dtype(torch.float32)
    free = torch.cuda.mem_get_info()[0] - args.reserve_gib * 2**30
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; model {torch.cuda.memory_allocated() / 2**30:.1f} GiB, "
          f"{free / 2**30:.1f} GiB left for caches")

    gpu = gpu_name()
    rows = []
    for context in args.contexts:
        for name in args.kv:
            if name == "quanto" and args.quanto_ext:
                build_quanto_extension()
            steps = args.steps if name != "quanto" or args.quanto_ext else max(2, args.steps // 8)
            largest = min(args.max_batch, int(free // (token_bytes(name) * (context + steps + 64))))
            variants = args.gluon_stages if args.gluon_stages and name not in ("fp16", "static", "quanto") else [None]
            for i, stages in enumerate(variants):
                for wanted in args.batches:
                    batch = largest if wanted == "max" else int(wanted)
                    graphs = (False, True) if args.graph and name in GRAPHED and batch <= 16 and i == 0 else (False,)
                    for graph in graphs:  # (graphs run the Triton kernel: no stages to force)
                        row, batch = run_fitting(model, name, context, batch, steps, graph, args.backend,
                                                 wanted == "max", None if graph else stages)
                        rows += [row] if row else []
                        write_atomic(args.out / f"generate_{gpu}.json", json.dumps(rows, indent=1))  # kept if a later row dies

    print(f"\n{'kv':16} {'T':>6} {'B':>4} {'tok/s':>9} {'ms/step':>8} {'x static':>8} {'peak GiB':>8}")
    for r in rows:  # x static: against StaticCache at the same context and batch (graphs against graphs)
        ref = {(x["batch"], x["graph"]): x["tokens_per_s"] for x in rows if x["context"] == r["context"] and x["kv"] == "static"}
        ratio = f"{r['tokens_per_s'] / ref[r['batch'], r['graph']]:8.2f}" if (r["batch"], r["graph"]) in ref else "       -"
        print(f"{r['kv'] + ' graph' * r['graph']:16} {r['context']:6} {r['batch']:4} {r['tokens_per_s']:9.1f} "
              f"{r['ms_per_step']:8.2f} {ratio} {r['peak_mem_gib']:8.1f}")


if __name__ == "__main__":
    main()
