"""Decode attention time vs context and batch at the Llama-3.1-8B attention shape (32 q heads, 8 KV heads, D 128).

One query token per sequence; every figure is measured in the same run as its baseline:

* ``sdpa_fp16``: ``scaled_dot_product_attention(..., enable_gqa=True)`` over a bf16 cache;
* ``kvtuner``: the packed split-K decode kernel (group 32, the last 32 tokens in a bf16 residual);
* ``gluon``: the Gluon tensor-core kernel (:mod:`kvtuner.kernels.gluon_decode`) on the same storage, and
  ``gluon_s0`` the same kernel without its shared-memory stages where its default has them (2- and 4-bit sides);
* ``dequant_sdpa`` (``+nuq`` pairs): the torch path a layer takes where the kernel does not read its
  storage: dequantize the history, concatenate the residual, SDPA;
* ``quanto``: transformers' ``QuantizedCache(backend="quanto")`` read path (its defaults: group 64,
  residual 128, here holding 32 tokens): dequantize the history, concatenate the residual, SDPA.

``bytes_read`` is what each path must read (query, stored cache bytes); ``gbps`` is that over the
median time, set against a device-to-device copy (bytes read + written) timed in the same run.
Inputs are random (times do not depend on values; zeros could flatter them); ``do_bench`` flushes
L2 before every repetition. Writes ``attention_<gpu>.json`` and a plot to ``--out``. ``--graph``
times CUDA-graph replays instead (each call after an L2 flush, the flush's own time taken off):
GPU time without the host's launch overhead, which bounds eager calls below ~8k tokens a batch.

    PYTHONPATH=src python benchmarks/bench_attention.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kvtuner import kernels
from kvtuner.config import write_atomic
from kvtuner.kernels.decode import decode_attention_triton
from kvtuner.kernels.gluon_decode import decode_attention_gluon, default_stages, gluon_supported
from kvtuner.kernels.reference import decode_attention_reference
from kvtuner.quant import QuantSpec
from kvtuner.quant import quantize as quantize_reference
from kvtuner.quant.codebook import snap_levels

H_Q, H_KV, D, GROUP, RESIDUAL = 32, 8, 128, 32, 32
KV = {f"K{k}V{v}": (k, v) for k in (8, 4, 2) for v in (8, 4, 2)}
NUQ_KV = {f"{name}+nuq": bits for name, bits in KV.items() if max(bits) <= 4}  # codebooks: 2-4 bits
HEADLINE_KV = ["K8V8", "K8V4", "K4V4", "K4V2", "K2V2"]
QUANTO_BITS = {"K4V4": 4, "K2V2": 2}
SWEEP = [dict(), dict(num_warps=4), dict(num_warps=2), dict(num_stages=3), dict(inline_asm=False)]  # {}: defaults


def batch_tokens(point: str) -> tuple[int, int]:
    """argparse type of a ``B:T`` point: (batch, tokens), both positive integers."""
    batch, sep, tokens = point.partition(":")
    if not (sep and batch.isdigit() and tokens.isdigit() and int(batch) > 0 and int(tokens) > 0):
        raise argparse.ArgumentTypeError(f"a point is batch:tokens, two positive integers, not {point!r}")
    return int(batch), int(tokens)


def gpu_name() -> str:
    return torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0].lower()


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


FLUSHES = ("write", "read")


def graph_ms(fn, calls: int = 20, replays: int = 15, flush: str = "write") -> float:
    """Median GPU time of one ``fn()`` from CUDA-graph replays of ``calls`` x (L2 flush, fn), less the flushes.

    ``flush="write"`` zeroes 256 MiB, as ``triton.testing.do_bench`` does: L2 is left full of dirty lines, whose
    write-back to HBM then shares the bandwidth with ``fn``'s first reads. ``"read"`` reads the 256 MiB instead
    and leaves L2 full of clean lines, as the weights a decode step's matrix products read leave it."""
    if flush not in FLUSHES:
        raise ValueError(f"flush is one of {FLUSHES}, not {flush!r}")
    buffer = torch.empty(2**28, dtype=torch.int8, device="cuda")
    flush_l2 = buffer.zero_ if flush == "write" else lambda: buffer.view(torch.int64).sum()

    def replay_ms(body) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()  # compile and allocate outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2] / calls

    both = replay_ms(lambda: (flush_l2(), fn()))
    return both - replay_ms(flush_l2)


def copy_gbps(nbytes: int = 2**30) -> float:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src)) / 1e6


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pack(k_hist, v_hist, k_bits, v_bits, codebook=False):
    """Packed history; ``codebook``: codes index a non-uniform level table a side (any sorted table:
    the kernel's time does not depend on the levels), quantized by the torch reference."""
    specs = QuantSpec(k_bits, GROUP, "channel"), QuantSpec(v_bits, GROUP, "token")
    if not codebook:
        return tuple(kernels.quantize(x, spec, backend="triton") for x, spec in zip((k_hist, v_hist), specs))
    levels = [snap_levels((2**s.bits - 1) * torch.linspace(0, 1, 2**s.bits) ** 1.5, s.bits).cuda() for s in specs]
    return tuple(quantize_reference(x, spec, levels=lv) for x, spec, lv in zip((k_hist, v_hist), specs, levels))


def quanto_stored(qt) -> list[torch.Tensor]:
    """The plain tensors inside a quanto tensor (packed codes, scales, shifts)."""
    if not hasattr(qt, "__tensor_flatten__"):
        return [qt]
    return [t for name in qt.__tensor_flatten__()[0] for t in quanto_stored(getattr(qt, name))]


def quanto_layer(k_hist, v_hist, bits):
    from transformers import LlamaConfig, QuantizedCache

    config = LlamaConfig(hidden_size=H_Q * D, num_attention_heads=H_Q, num_key_value_heads=H_KV, num_hidden_layers=1)
    layer = QuantizedCache(backend="quanto", config=config, nbits=bits).layers[0]
    layer.update(k_hist, v_hist)  # the first update quantizes everything it is given
    return layer


def check_correctness(q, k, v) -> float:
    """Relative error of the K4V4 kernel against the float64 reference on the same packed cache."""
    qk, qv = pack(k[:, :, :-RESIDUAL], v[:, :, :-RESIDUAL], 4, 4)
    kr, vr = k[:, :, -RESIDUAL:], v[:, :, -RESIDUAL:]
    out = decode_attention_triton(q, qk, qv, kr, vr, D**-0.5).double()
    ref = decode_attention_reference(q.double(), qk, qv, kr, vr, D**-0.5, compute_dtype=torch.float64)
    return ((out - ref).norm() / ref.norm()).item()


def bench_point(batch, context, kv_names, with_quanto, tunables) -> list[dict]:
    q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, H_KV, context, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    hist = k[:, :, :-RESIDUAL], v[:, :, :-RESIDUAL]
    res = k[:, :, -RESIDUAL:], v[:, :, -RESIDUAL:]
    q4 = q.unsqueeze(2)
    rows = [dict(impl="sdpa_fp16", kv="fp16", ms=median_ms(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)),
                 bytes_read=nbytes(q, k, v))]
    for name in kv_names:
        rows += time_kvtuner(q, hist, res, name, tunables)
    for name in QUANTO_BITS if with_quanto else ():
        try:
            rows.append(time_quanto(q4, hist, res, name))
        except torch.OutOfMemoryError:
            print(f"  quanto {name} B={batch} T={context}: out of memory, skipped")
        torch.cuda.empty_cache()
    return [dict(impl=r["impl"], kv=r["kv"], batch=batch, context=context, ms=r["ms"], bytes_read=r["bytes_read"],
                 gbps=r["bytes_read"] / r["ms"] / 1e6, **({"tune": r["tune"]} if "tune" in r else {})) for r in rows]


def time_kvtuner(q, hist, res, name, tunables) -> list[dict]:
    qk, qv = pack(*hist, *{**KV, **NUQ_KV}[name], codebook=name.endswith("+nuq"))
    read = nbytes(q, *res, *qk.stored_tensors(), *qv.stored_tensors())
    rows = []
    for tune in tunables:
        ms = median_ms(lambda: decode_attention_triton(q, qk, qv, *res, D**-0.5, **tune))
        rows.append(dict(impl="kvtuner", kv=name, ms=ms, bytes_read=read, **({"tune": tune} if len(tunables) > 1 else {})))
    if gluon_supported(qk, qv, q):  # the Gluon kernel, same storage, with and without its stages
        variants = {"gluon": None}
        if default_stages(qk.spec.bits, qv.spec.bits):
            variants["gluon_s0"] = 0
        for impl, stages in variants.items():
            ms = median_ms(lambda: decode_attention_gluon(q, qk, qv, *res, D**-0.5, stages=stages))
            rows.append(dict(impl=impl, kv=name, ms=ms, bytes_read=read))
    if name.endswith("+nuq"):  # what such a layer cost before the kernel read codebooks: dequantize, then SDPA
        q4 = q.unsqueeze(2)

        def torch_path():
            keys = torch.cat([qk.dequantize(q.dtype), res[0]], dim=-2)
            values = torch.cat([qv.dequantize(q.dtype), res[1]], dim=-2)
            return F.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)

        rows.append(dict(impl="dequant_sdpa", kv=name, ms=median_ms(torch_path), bytes_read=read))
    return rows


def time_quanto(q4, hist, res, name) -> dict:
    layer = quanto_layer(*hist, QUANTO_BITS[name])
    qk, qv = layer._quantized_keys, layer._quantized_values

    def step():
        keys = torch.cat([layer._dequantize(qk), res[0]], dim=-2)
        values = torch.cat([layer._dequantize(qv), res[1]], dim=-2)
        return F.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)

    read = nbytes(q4, *res, *quanto_stored(qk), *quanto_stored(qv))
    return dict(impl="quanto", kv=name, ms=median_ms(step), bytes_read=read)


def use_quanto_torch_unpack() -> None:
    """Serve quanto's CUDA ``unpack`` with plain torch ops instead of JIT-building its extension (minutes of nvcc).

    quanto packs ``8 // bits`` codes a byte, code ``i`` of each group of rows in bits ``bits*i``
    upward, and unpacks them by concatenating the planes along dim 0.
    """
    import types

    from optimum.quanto.library.extensions import cuda

    def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
        planes = [(packed >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)]
        return torch.cat(planes).to(torch.uint8)

    cuda.ext._lib = types.SimpleNamespace(unpack=unpack)


def plot(rows, path: Path, copy: float) -> None:
    """Top row: effective bandwidth against the copy's; bottom row: speed-up over bf16 SDPA (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    base = {(r["batch"], r["context"]): r["ms"] for r in rows if r["impl"] == "sdpa_fp16" and "tune" not in r}
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches), 7.5), squeeze=False, sharex=True)
    for col, b in enumerate(batches):
        bw, speed = axes[0][col], axes[1][col]
        for key in sorted({(r["impl"], r["kv"]) for r in rows if r["batch"] == b and "tune" not in r}):
            pts = sorted((r["context"], r["gbps"], base[b, r["context"]] / r["ms"]) for r in rows
                         if (r["impl"], r["kv"]) == key and r["batch"] == b and "tune" not in r)
            for ax, i in ((bw, 1), (speed, 2)):
                ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
        bw.axhline(copy, color="k", ls="--", lw=0.8, label="d2d copy")
        bw.set(xscale="log", title=f"batch {b}", ylabel="effective GB/s")
        speed.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="x bf16 SDPA")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--points", nargs="+", type=batch_tokens, metavar="B:T",
                    help="(batch, context) points instead of batches x contexts")
    ap.add_argument("--kv", nargs="+", default=HEADLINE_KV, choices=[*KV, *NUQ_KV],
                    help="bit pairs; NAME+nuq: the same codes indexing a level table (the codebook lookup's cost)")
    ap.add_argument("--tune", type=json.loads, default={}, help="launch options for every kernel call, as JSON")
    ap.add_argument("--no-quanto", action="store_true")
    ap.add_argument("--quanto-ext", action="store_true", help="use quanto's JIT-built CUDA extension (else its torch unpack)")
    ap.add_argument("--sweep", action="store_true", help="time launch variants of the kernel (PTX or Triton decoding, "
                    "registers, warps, stages); writes attention_<gpu>_sweep.json")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (GPU time, no launch overhead); "
                    "writes attention_<gpu>_graph.json")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--plot", type=Path, default=Path("runs"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")

    torch.manual_seed(0)
    if args.graph:
        global median_ms
        median_ms = graph_ms
    with_quanto = not args.no_quanto
    if with_quanto and not args.quanto_ext:
        use_quanto_torch_unpack()
    tunables = [{**args.tune, **t} for t in SWEEP] if args.sweep else [args.tune]
    gpu = gpu_name()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    q = torch.randn(2, H_Q, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, H_KV, 4096, D, device="cuda", dtype=torch.bfloat16)
    print(f"K4V4 kernel vs float64 reference: rel err {check_correctness(q, k, torch.randn_like(k)):.2e}")
    copy = copy_gbps()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)")

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, copy_gbps=copy,
                tune=args.tune)
    name = f"attention_{gpu}{'_sweep' if args.sweep else ''}{'_graph' if args.graph else ''}"
    write_atomic(args.out / f"{name}_meta.json", json.dumps(meta, indent=1))
    rows = []
    points = args.points or [(b, t) for b in args.batches for t in args.contexts]
    for batch, context in points:
        t0 = time.time()
        try:
            rows += bench_point(batch, context, args.kv, with_quanto, tunables)
        except torch.OutOfMemoryError:
            print(f"B={batch} T={context}: bf16 cache does not fit, skipped")
        torch.cuda.empty_cache()
        write_atomic(args.out / f"{name}.json", json.dumps(rows, indent=1))  # kept if a later point dies
        print(f"B={batch} T={context} done in {time.time() - t0:.1f}s", flush=True)

    base = {(r["batch"], r["context"]): r["ms"] for r in rows if r["impl"] == "sdpa_fp16"}
    print(f"\n{'impl':12} {'kv':9} {'B':>3} {'T':>7} {'ms':>8} {'GB/s':>6} {'%copy':>5} {'x sdpa':>6}  tune")
    for r in rows:
        print(f"{r['impl']:12} {r['kv']:9} {r['batch']:>3} {r['context']:>7} {r['ms']:8.3f} {r['gbps']:6.0f} "
              f"{100 * r['gbps'] / copy:5.0f} {base[r['batch'], r['context']] / r['ms']:6.2f}  {r.get('tune', '')}")
    args.plot.mkdir(parents=True, exist_ok=True)
    plot(rows, args.plot / f"{name}.png", copy)


if __name__ == "__main__":
    main()
