"""Split-K packed decode attention against a float64 reference over the dequantized cache.

Runs the kernels compiled on CUDA, else in Triton's interpreter on the CPU. The reference
attends to exactly the dequantized history plus residual, so the error left is the kernel's
own rounding (fp16 dot operands, output in the query dtype): relative RMS under 2e-3 for fp16
inputs, 6e-3 for bf16 (the interpreter truncates fp32 to bf16 where the GPU rounds: ~3.5e-3).
On CUDA the codes are decoded by PTX (``lop3``/``prmt``); the interpreter runs the same integer
arithmetic in Triton, and a GPU test runs that path too.
"""

import itertools
import math
import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before importing them
pytest.importorskip("triton")

import kvtuner.kernels.decode as kd  # noqa: E402
from kvtuner import kernels  # noqa: E402
from kvtuner.kernels.reference import decode_attention_reference  # noqa: E402
from kvtuner.quant import QuantSpec, quantize  # noqa: E402
from kvtuner.quant.codebook import snap_levels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 6e-3}


@pytest.fixture(autouse=True)
def poisoned(poison_torch):
    poison_torch(kd)


def make_case(k_bits, v_bits, ratio, n_hist, n_res, dtype=torch.float16, batch=2, h_kv=2, d=128, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    k_spec, v_spec = QuantSpec(k_bits, group, "channel"), QuantSpec(v_bits, group, "token")
    hist_k = rand(batch, h_kv, n_hist, d, scale=2.0)
    hist_k[..., 3] += 8.0  # an outlier channel, the reason keys are grouped per channel
    qkeys = quantize(hist_k, k_spec) if n_hist else None
    qvalues = quantize(rand(batch, h_kv, n_hist, d), v_spec) if n_hist else None
    return dict(
        query=rand(batch, h_kv * ratio, d), qkeys=qkeys, qvalues=qvalues,
        keys=rand(batch, h_kv, n_res, d, scale=2.0), values=rand(batch, h_kv, n_res, d),
        scale=d**-0.5, key_spec=k_spec, value_spec=v_spec,
    )


def rel_err(case, **launch):
    args = {k: v for k, v in case.items() if k not in ("key_spec", "value_spec")}
    if not launch:
        out = kernels.decode_attention(**case, backend="triton")
    else:
        out = kd.decode_attention_triton(**args, **launch)
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, compute_dtype=torch.float64)
    assert out.shape == ref.shape and out.dtype == case["query"].dtype
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


PAIRS = list(itertools.product([2, 4, 8], repeat=2))


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("k_bits,v_bits", PAIRS)
def test_every_bit_pair_and_gqa_ratio(k_bits, v_bits, ratio):
    n_hist, n_res = ((32, 31), (64, 13))[PAIRS.index((k_bits, v_bits)) % 2]  # T = 63 or 77
    case = make_case(k_bits, v_bits, ratio, n_hist, n_res, seed=k_bits * 10 + v_bits)
    assert rel_err(case) < TOL[torch.float16]


@pytest.mark.parametrize("k_bits,v_bits", [(3, 3), (3, 8), (1, 2)])
def test_three_and_one_bit(k_bits, v_bits):
    assert rel_err(make_case(k_bits, v_bits, 4, 64, 13)) < TOL[torch.float16]


@pytest.mark.parametrize("group", [32, 16])
def test_bf16_many_splits_and_empty_ones(group):
    """672 tokens, 128 a step: 6 steps, the last short; 4 splits of 2 steps leave one empty. Group 16
    stacks 32 rows (8 value groups a token), which the launcher runs one step a program."""
    case = make_case(4, 2, 4, 672, 5, dtype=torch.bfloat16, batch=1, group=group)
    for splits in (1, 4, 6):
        assert rel_err(case, num_splits=splits) < TOL[torch.bfloat16]


@pytest.mark.parametrize("n_hist,group", [(256, 32), (416, 32), (448, 64)])
def test_whole_steps_and_the_partial_last_step(n_hist, group):
    """Whole 128-token steps are read unmasked; a partial last step is read as the history's last 128
    tokens, the ones an earlier step saw masked out (group 64: 2 value groups, fewer than the row copies)."""
    case = make_case(2, 4, 4, n_hist, 3, batch=1, group=group)
    for splits in (1, 2, 3):
        assert rel_err(case, num_splits=splits) < TOL[torch.float16]


def test_residual_only_and_head_dim_64():
    assert rel_err(make_case(4, 4, 4, 0, 9)) < TOL[torch.float16]  # before the first flush
    assert rel_err(make_case(2, 4, 8, 96, 32, d=64)) < TOL[torch.float16]


def test_unsupported_layout_raises_when_forced_and_falls_back_on_auto():
    case = make_case(4, 4, 4, 32, 3)
    case["key_spec"] = QuantSpec(4, 32, "token")  # per-token keys: not the MixPE layout
    with pytest.raises(ValueError, match="does not support"):
        kernels.decode_attention(**case, backend="triton")
    case["qkeys"] = quantize(torch.randn(2, 2, 32, 128).to(DEVICE, torch.float16), case["key_spec"])
    assert kernels.decode_attention(**case).isfinite().all()


def with_levels(case, k_levels, v_levels):
    """``case`` with its history re-quantized against non-uniform level tables (None: uniform)."""
    hist_k, hist_v = case["qkeys"].dequantize(), case["qvalues"].dequantize()
    dtype = case["query"].dtype
    return {**case, "qkeys": quantize(hist_k.to(dtype), case["key_spec"], levels=k_levels),
            "qvalues": quantize(hist_v.to(dtype), case["value_spec"], levels=v_levels)}


def skewed_levels(bits, power):
    """Sorted levels in [0, qmax] with pinned ends, bunched towards 0 (power > 1) or qmax (power < 1), on the
    kernel's grid."""
    return snap_levels((2**bits - 1) * torch.linspace(0, 1, 2**bits) ** power, bits)


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (3, 4), (4, 3), (4, 4)])
def test_codebook_levels_are_looked_up_in_the_kernel(k_bits, v_bits):
    """NUQ: every code indexes a table; keys bunched low, values high (an asymmetric table catches a
    reversed or mis-centred lookup), one side at a time and both."""
    case = make_case(k_bits, v_bits, 4, 64, 13, seed=k_bits * 7 + v_bits)
    for k_levels, v_levels in ((skewed_levels(k_bits, 2.0), None), (None, skewed_levels(v_bits, 0.5)),
                               (skewed_levels(k_bits, 2.0), skewed_levels(v_bits, 0.5))):
        nuq = with_levels(case, k_levels, v_levels)
        assert rel_err(nuq) < TOL[torch.float16]
        # the same codes read as uniform levels give another answer: the kernel did use the tables
        uniform = {**nuq, "qkeys": replace(nuq["qkeys"], levels=None), "qvalues": replace(nuq["qvalues"], levels=None)}
        got = kernels.decode_attention(**nuq, backend="triton")
        assert (got - kernels.decode_attention(**uniform, backend="triton")).abs().max() > 1e-2


def test_levels_off_the_grid_are_refused():
    case = with_levels(make_case(4, 4, 4, 32, 3), torch.linspace(0, 15, 16).half() ** 1.01, None)
    with pytest.raises(ValueError, match="off the kernel's grid"):
        kernels.decode_attention(**case, backend="triton")


@pytest.mark.parametrize("n_hist,start", [(64, 1), (64, 5), (64, 40), (416, 130), (416, 300)])
def test_history_start_skips_the_sink_slots(n_hist, start):
    """Tokens before ``history_start`` are not attended: the kernel matches a reference without them, and
    a huge key in a skipped slot (which would take all the attention) changes nothing; in a history
    shorter than a step and across whole steps, the moved partial last step and several splits."""
    case = make_case(4, 2, 4, n_hist, 7, seed=start, batch=1)
    hist_k = case["qkeys"].dequantize()
    hist_k[..., :start, :] = 50.0
    case["qkeys"] = quantize(hist_k.to(case["query"].dtype), case["key_spec"])
    args = {k: v for k, v in case.items() if k not in ("key_spec", "value_spec")}
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, history_start=start,
                                     compute_dtype=torch.float64)
    for splits in (1, 3) if n_hist > 128 else (None,):
        out = kd.decode_attention_triton(**args, history_start=start, num_splits=splits)
        assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (3, 3), (4, 4), (4, 2)])
def test_codebooks_on_gpu(k_bits, v_bits):
    case = with_levels(make_case(k_bits, v_bits, 4, 32 * 41, 32, dtype=torch.bfloat16, h_kv=8, seed=13),
                       skewed_levels(k_bits, 2.0), skewed_levels(v_bits, 0.5))
    assert rel_err(case) < TOL[torch.bfloat16]
    assert rel_err(case, inline_asm=False) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k_bits,v_bits", PAIRS + [(3, 3), (1, 2)])
def test_triton_decoding_path_on_gpu(k_bits, v_bits):
    """The pure-Triton decoding (the interpreter's) compiled for the GPU, beside the PTX default."""
    case = make_case(k_bits, v_bits, 4, 32 * 9, 7, seed=k_bits * 10 + v_bits + 1)
    assert rel_err(case, inline_asm=False) < TOL[torch.float16]
    assert rel_err(case, inline_asm=True) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("launch", [dict(num_warps=8), dict(num_warps=2, maxnreg=None), dict(num_stages=3), dict(maxnreg=None)])
def test_launch_tunables_on_gpu(launch):
    case = make_case(4, 2, 4, 32 * 41, 32, dtype=torch.bfloat16, batch=2, h_kv=8, seed=3)
    assert rel_err(case, **launch) < TOL[torch.bfloat16]


@pytest.mark.parametrize("num_warps", [2, 4])
def test_scores_that_keep_growing_rescale_the_softmax_state(num_warps):
    """Keys whose norm ramps up 12x along the history: each 128-token step raises the rows' max score by
    more than 8 (log2 units), so one program rescales its accumulators by 2^-8 or less again and again."""
    case = make_case(4, 4, 4, 32 * 16, 5, seed=5)
    ramp = torch.linspace(0.5, 6.0, 32 * 16, device=DEVICE)[None, None, :, None]
    keys = case["qkeys"].dequantize() * ramp
    query = case["query"] * 2
    log2_scores = torch.einsum("bhrd,bhtd->bhrt", query.float().view(2, 2, 4, 128), keys) * 128**-0.5 * kd.LOG2E
    step_max = log2_scores.view(2, 2, 4, 4, 128).amax(-1)
    assert (step_max.diff(dim=-1) > 8).float().mean() > 0.8  # the premise
    case = {**case, "qkeys": quantize(keys.to(query.dtype), case["key_spec"]), "query": query}
    assert rel_err(case, num_splits=1, num_warps=num_warps) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_long_context_on_gpu():
    case = make_case(4, 4, 4, 32 * 512, 32, dtype=torch.bfloat16, batch=3, h_kv=8, seed=7)
    assert rel_err(case) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (2, 2), (8, 8)])
def test_diffuse_attention_over_a_long_history_in_one_split_on_gpu(k_bits, v_bits):
    """32k tokens of unit-variance keys (no outlier): near-uniform attention, a small output, and 256
    steps accumulated in one program. The tensor cores' truncating fp32 accumulation made this 30-90%
    wrong while value codes carried their 1024 offset into the accumulator."""
    g = torch.Generator().manual_seed(11)
    k, v = (torch.randn(1, 2, 32768, 128, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    case = dict(query=torch.randn(1, 8, 128, generator=g).to(DEVICE, torch.bfloat16),
                qkeys=quantize(k[:, :, :-32], QuantSpec(k_bits, 32, "channel")),
                qvalues=quantize(v[:, :, :-32], QuantSpec(v_bits, 32, "token")),
                keys=k[:, :, -32:], values=v[:, :, -32:], scale=128**-0.5)
    assert rel_err(case, num_splits=1) < TOL[torch.bfloat16]



@pytest.mark.parametrize("launch", [kd.MERGE_LAUNCH, kd.DEPENDENT_MERGE_LAUNCH])
def test_residual_merge_joins_partial_history_results_with_the_residual(launch, monkeypatch):
    """merge_with_residual (the Gluon kernel's residual and merge, one launch) against the reference: the history
    split in eleven uneven parts, each a normalized output and its base-2 log-sum-exp, as a history kernel
    writes them; one part empty (lse -inf) as a split past the history's end would leave it. The dependent launch's
    shape (one warp, 8 residual tokens and 8 parts a loop step: the 19 tokens take three, the parts two), launched
    here the ordinary way (the interpreter runs no dependent launch), computes the same."""
    monkeypatch.setattr(kd, "MERGE_LAUNCH", launch)
    case = make_case(4, 4, 4, 32 * 6, 19, seed=21)
    args = {k: v for k, v in case.items() if k not in ("key_spec", "value_spec")}
    b, h_q, d = args["query"].shape
    h_kv = args["keys"].shape[1]
    k_hist = args["qkeys"].dequantize(torch.float64)
    v_hist = args["qvalues"].dequantize(torch.float64)
    q = args["query"].double().reshape(b, h_kv, h_q // h_kv, d) * args["scale"]
    parts_o, parts_lse = [], []
    cuts = (0, 50, 50, 70, 90, 100, 120, 130, 150, 160, 170, 192)
    for lo, hi in zip(cuts, cuts[1:]):
        s = torch.einsum("bhrd,bhtd->bhrt", q, k_hist[:, :, lo:hi]) / math.log(2)
        if hi > lo:
            lse = torch.logsumexp(s * math.log(2), -1) / math.log(2)
            o = torch.einsum("bhrt,bhtd->bhrd", torch.softmax(s * math.log(2), -1), v_hist[:, :, lo:hi])
        else:  # what a split past the history's end leaves
            lse, o = torch.full(s.shape[:-1], -math.inf, dtype=s.dtype, device=s.device), torch.zeros_like(q)
        parts_o.append(o.reshape(b * h_q, d))
        parts_lse.append(lse.reshape(b * h_q))
    o_part = torch.stack(parts_o, 1).float()
    lse_part = torch.stack(parts_lse, 1).float()
    out = kd.merge_with_residual(args["query"], args["keys"], args["values"], args["scale"], o_part, lse_part)
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, compute_dtype=torch.float64)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


@pytest.mark.parametrize("n_hist,n_res,splits", [(128, 1, None), (416, 17, 3), (448, 32, 7), (160, 5, 2)])
def test_lengths_read_from_the_device_over_larger_buffers(n_hist, n_res, splits):
    """A CUDA graph replays one launch for every step: the kernel reads (history, residual) tokens from a device
    tensor, over buffers of larger capacity whose tokens past those lengths hold other values (here: a different,
    larger-magnitude history and residual), and splits planned for the whole capacity, some left empty."""
    case = make_case(4, 2, 4, n_hist, n_res, seed=n_hist + n_res)
    spare = make_case(4, 2, 4, 640, 32, seed=7)
    buffers = {}
    for name in ("qkeys", "qvalues"):  # the case's tokens first, then 3x larger ones the kernel must not read
        big, small = spare[name], case[name]
        stored = []
        for b, s_ in zip(big.stored_tensors(), small.stored_tensors()):
            b = (b * 3 if b.is_floating_point() else b).clone()
            b[..., : s_.shape[-2], :] = s_
            stored.append(b)
        buffers[name] = replace(big, payload=stored[0], scale=stored[1], zero=stored[2])
    res = {}
    for name in ("keys", "values"):
        r = spare[name].clone() * 3
        r[..., :n_res, :] = case[name]
        res[name] = r
    lengths = torch.tensor([n_hist, n_res], dtype=torch.int32, device=DEVICE)
    out = kd.decode_attention_triton(case["query"], buffers["qkeys"], buffers["qvalues"], res["keys"], res["values"],
                                     case["scale"], num_splits=splits, lengths=lengths)
    args = {k: v for k, v in case.items() if k not in ("key_spec", "value_spec")}
    ref = decode_attention_reference(**{**args, "query": args["query"].double()}, compute_dtype=torch.float64)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


def test_device_lengths_refuse_sink_tokens_and_an_empty_history():
    case = make_case(4, 4, 1, 128, 3)
    lengths = torch.tensor([128, 3], dtype=torch.int32, device=DEVICE)
    args = {k: v for k, v in case.items() if k not in ("key_spec", "value_spec")}
    with pytest.raises(ValueError, match="lengths"):
        kd.decode_attention_triton(**args, history_start=1, lengths=lengths)
    with pytest.raises(ValueError, match="lengths"):
        kd.decode_attention_triton(**{**args, "qkeys": None, "qvalues": None}, lengths=lengths)


def stored_apart(case, capacity, res_capacity):
    """Batch 1 ``case``'s history and residual as the front of larger buffers (a layer's reserved capacity), so its
    head strides differ from other rows'; the tokens past its lengths hold 3x larger values the kernel must not read."""
    out = dict(case)
    for name in ("qkeys", "qvalues"):
        q = case[name]
        if q is None:
            continue
        stored = []
        for t in q.stored_tensors():
            big = torch.cat([t, t.repeat(1, 1, -(-capacity // t.shape[2]), 1)], 2)[:, :, :capacity].clone()
            if big.is_floating_point():
                big[:, :, t.shape[2] :] *= 3
            stored.append(big[:, :, : t.shape[2]])
        out[name] = replace(q, payload=stored[0], scale=stored[1], zero=stored[2])
    for name in ("keys", "values"):
        t = case[name]
        big = torch.randn(1, t.shape[1], res_capacity, t.shape[3], dtype=t.dtype, device=t.device) * 6
        big[:, :, : t.shape[2]] = t
        out[name] = big[:, :, : t.shape[2]]
    return out


@pytest.mark.parametrize("lengths,ratio,dtype,splits,misaligned,bits", [
    ([(0, 5), (64, 3), (320, 17), (160, 1, 3)], 3, torch.float16, None, False, (4, 2)),  # < a step: masked loads
    ([(256, 9), (416, 32, 130), (0, 2), (128, 1)], 4, torch.bfloat16, 3, True, (4, 2)),  # whole steps, sinks
    ([(0, 7), (0, 1)], 1, torch.float16, None, False, (4, 2)),  # no history anywhere: the residual programs alone
    ([(96, 4), (0, 3), (288, 30)], 7, torch.float16, 2, False, (3, 3)),  # 3-bit codes: two planes a word
    ([(192, 6), (384, 11, 2)], 4, torch.float16, None, False, "levels"),  # codebooks
])
def test_ragged_rows_in_one_launch_match_each_row_alone(lengths, ratio, dtype, splits, misaligned, bits,
                                                       split_launches):
    """A left-padded batch's rows are stored apart, each with its own lengths, buffers (head strides) and sink
    tokens: one launch reads each row's from a table, and row i matches a float64 reference over row i alone.
    Rows without a history do not make the others' loads masked (only a history shorter than a step does)."""
    rows, refs, queries = [], [], []
    for i, (n_hist, n_res, *start) in enumerate(lengths):
        case = make_case(*((4, 4) if bits == "levels" else bits), ratio, n_hist, n_res, dtype=dtype, batch=1,
                         seed=100 + i)
        if bits == "levels":
            case = with_levels(case, skewed_levels(4, 1.6), skewed_levels(4, 0.7))
        start = start[0] if start else 0
        args = {k: v for k, v in case.items() if k not in ("key_spec", "value_spec")}
        refs.append(decode_attention_reference(**{**args, "query": args["query"].double()}, history_start=start,
                                               compute_dtype=torch.float64))
        apart = stored_apart(case, capacity=n_hist + 96 * (i + 1), res_capacity=32 + i)
        rows.append((apart["qkeys"], apart["qvalues"], apart["keys"], apart["values"], start))
        queries.append(case["query"])
    if misaligned:  # a residual 2 bytes off 16-byte alignment: the kernel is not told its addresses are aligned
        keys = rows[-1][2]
        shifted = torch.empty(keys.numel() + 1, dtype=keys.dtype, device=keys.device)[1:].view(keys.shape)
        shifted.copy_(keys)
        rows[-1] = (*rows[-1][:2], shifted, *rows[-1][3:])
    with split_launches() as counted:
        out = kd.decode_attention_triton_rows(torch.cat(queries), rows, case["scale"], num_splits=splits)
    launches = [kw for _, kw in counted]
    assert [kw["PER_ROW"] for kw in launches] == [True] and launches[0]["ALIGNED"] == (not misaligned)
    assert launches[0]["SHORT"] == (any(0 < n < 128 for n, *_ in lengths) or all(n == 0 for n, *_ in lengths))
    assert out.dtype == dtype
    for got, ref in zip(out, refs):
        assert ((got.double() - ref[0]).norm() / ref.norm()).item() < TOL[dtype]


def test_ragged_rows_refuse_mixed_layouts_and_dispatch_per_backend():
    """Every row is checked, not only the one the kernel is compiled for: a row it would misread is refused."""
    a = make_case(4, 2, 4, 64, 3, batch=1)
    b = make_case(2, 2, 4, 64, 3, batch=1, seed=1)
    row = lambda c: (c["qkeys"], c["qvalues"], c["keys"], c["values"], 0)  # noqa: E731
    query = torch.cat([a["query"], b["query"]])
    with pytest.raises(ValueError, match="share shapes but length, bits"):
        kd.decode_attention_triton_rows(query, [row(a), row(b)], a["scale"])
    with pytest.raises(ValueError, match="2 query rows for 1"):
        kd.decode_attention_triton_rows(query, [row(a)], a["scale"])
    c = make_case(4, 2, 4, 64, 3, batch=1, seed=2)
    strided = torch.empty(*c["keys"].shape[:-1], 2 * c["keys"].shape[-1], device=DEVICE, dtype=c["keys"].dtype)[..., ::2]
    for bad in ({"keys": strided.copy_(c["keys"])}, {"values": c["values"].float()},
                {"qvalues": replace(c["qvalues"], zero=c["qvalues"].zero.float())}):
        with pytest.raises(ValueError, match="contiguous|share shapes"):
            kd.decode_attention_triton_rows(query, [row(a), row({**c, **bad})], a["scale"])
    c = make_case(4, 2, 4, 96, 1, batch=1, seed=2)
    want = torch.cat([kernels.decode_attention(x["query"], *row(x)[:4], x["scale"], x["key_spec"], x["value_spec"],
                                               "torch") for x in (a, c)])
    for backend in ("torch", "triton"):  # a row at a time; one launch
        got = kernels.decode_attention_rows(torch.cat([a["query"], c["query"]]), [row(a), row(c)], a["scale"],
                                            a["key_spec"], a["value_spec"], backend)
        assert ((got - want).double().norm() / want.double().norm()).item() < TOL[torch.float16]


TRITON_COMPILE = """
import json, re, sys
from kvtuner.kernels import decode
from kvtuner.kernels.sass import disassemble, loop_census
out = {}
for name, kw in json.loads(sys.argv[1]).items():
    kernel, tokens = decode.compile_sm90(**kw)
    out[name] = loop_census(kernel, tokens // kernel.metadata.num_warps)
_, alone, dependent = decode.compile_merges_sm90()
assert "griddepcontrol" not in alone.asm["ptx"] and dependent.asm["ptx"].count("griddepcontrol.wait") == 1
usage = re.search(r"REG:(\\d+) STACK:(\\d+)", disassemble(dependent)[0])
assert int(usage[1]) <= 64 and int(usage[2]) == 0, usage[0]  # the register cap DEPENDENT_MERGE_LAUNCH asks for
decode.compile_merges_sm90(head_dim=64, gqa=7, parts=1)
print(json.dumps(out))
"""


def test_every_launched_variant_compiles_for_sm90_with_the_gpu_images_triton(image_triton):
    """The interpreter (the project's triton) accepted a merge kernel that triton 3.6, the GPU image's, refuses to
    compile (a loop-carried value first given as a constant argument): every decode on a GPU failed until a device
    run showed it. So each kind of launch is compiled here for sm_90a as the GPU would: the split kernel plain,
    masked (short), with device lengths (CUDA graphs), per row (ragged batches), with codebooks and 3-bit codes;
    the reduce and residual-merge kernels (bf16 activations; the merge also as a programmatic dependent, which waits
    once for the history kernel). The per-row loop must stay as lean as the batched one
    (its table's addresses and strides hinted aligned)."""
    cases = {"K4V4": dict(k_bits=4, v_bits=4), "K4V4 rows": dict(k_bits=4, v_bits=4, per_row=True),
             "K4V4 rows unaligned": dict(k_bits=4, v_bits=4, per_row=True, aligned=False),
             "K2V2 lengths": dict(k_bits=2, v_bits=2, device_lengths=True),
             "K3V3 short nuq": dict(k_bits=3, v_bits=3, short=True, codebook=True),
             "K8V2 short D64 GQA7": dict(k_bits=8, v_bits=2, short=True, head_dim=64, gqa=7)}
    census = image_triton(TRITON_COMPILE, cases)  # (the subprocess fails on a kernel that does not compile)
    assert census["K4V4 rows"]["per_token"] <= 1.03 * census["K4V4"]["per_token"], census
    assert census["K4V4 rows"].get("LDG", 0) <= census["K4V4"].get("LDG", 0), census  # no scalar loads crept in
