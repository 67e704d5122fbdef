"""Left-padded batches: every row is stored and decoded exactly as that row alone would be.

Why a row alone is the oracle: a row's key groups (per channel, ``group_size`` tokens) start at its own first
token, so pads in front would shift its group boundaries and enter its statistics; the cache keeps each padded
row apart so that neither happens, and the pads cost no bytes.
"""

import math
from contextlib import nullcontext

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtuner import KVConfig, MixedPrecisionCache
from kvtuner.cache import MixedPrecisionLayer, cache_kwargs
from kvtuner.cache.attention import use_packed_attention
from kvtuner.config import parse_label
from kvtuner.kernels.native import native_available
from kvtuner.method import KVMethod

LENGTHS = (37, 50, 64)  # 27, 14 and 0 pads: each row's groups of 32 start at a different cache index
NEW_TOKENS = 40  # each row flushes a group while decoding, at its own step (its 64th or 96th token)
N_LAYERS = 2


@pytest.fixture(scope="module")
def llama32():
    """A tiny random Llama with head_dim 32, so groups of 32 tokens (the default) fit."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def prompts(lengths=LENGTHS):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (1, n), generator=g) for n in lengths]


def left_padded(rows):
    width = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0)) for r in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(r), (width - r.shape[1], 0)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, cache, inputs, **kw):
    """Greedy, always NEW_TOKENS tokens (no row stops early at a random EOS), with the raw logits of each step."""
    kw.setdefault("max_new_tokens", NEW_TOKENS)
    return model.generate(**inputs, **cache_kwargs(model, cache), do_sample=False, min_new_tokens=kw["max_new_tokens"],
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)


def row_history(cache, layer, row):
    """The stored history (packed codes, scales, zeros, sink tokens) of one row of a batch."""
    return cache.layers[layer].rows[row].history


def assert_same_bytes(got, want, exact=True):
    """Every stored tensor of two histories: equal, or (``exact=False``) equal up to codes that a float-noise
    difference in the K/V moved across a rounding boundary, and fp16 scales one rounding apart."""
    assert got.num_tokens == want.num_tokens
    for a, b in zip(got.stored_tensors(), want.stored_tensors(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if exact:
            assert torch.equal(a, b)
        elif a.dtype == torch.int32:  # packed codes: a few words may differ by one code
            assert (a != b).float().mean() < 0.01
        else:
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("kv", ["K4V2", "K2V2+sink1+prerope"])
def test_left_padded_batch_stores_and_decodes_each_row_as_alone(llama32, kv, one_thread):
    """The issue's test: a left-padded batch of 37, 50 and 64 tokens, 40 greedy tokens. Each row's logits at every
    step match the row run alone to float noise (1e-4 abs on fp32), its tokens are identical, and its stored
    history holds the same bytes. Not bit for bit: the batch computes the row's K/V with other matrix shapes and a
    padding mask, so they differ from the row alone's by ~2e-7, and a code sitting on a rounding boundary can flip
    (the layer-level test below feeds identical K/V and gets identical bytes)."""
    config = KVConfig.uniform(kv, N_LAYERS, group_size=32, residual_length=32)
    rows = prompts()
    width = max(LENGTHS)
    batch_cache = MixedPrecisionCache(config, llama32.config)
    batch = generate(llama32, batch_cache, left_padded(rows))
    for i, row in enumerate(rows):
        cache = MixedPrecisionCache(config, llama32.config)
        alone = generate(llama32, cache, {"input_ids": row})
        for step, (got, want) in enumerate(zip(batch.logits, alone.logits, strict=True)):
            torch.testing.assert_close(got[i], want[0], rtol=0, atol=1e-4, msg=f"row {i}, step {step}")
        assert torch.equal(batch.sequences[i, width:], alone.sequences[0, row.shape[1]:])
        for layer in range(N_LAYERS):
            assert_same_bytes(row_history(batch_cache, layer, i), cache.layers[layer].history, exact=False)
    assert batch_cache.get_seq_length() == width + NEW_TOKENS - 1


@pytest.mark.parametrize("kv", ["K4V2", "K2V2+sink1+prerope"])
def test_layer_stores_each_padded_row_bit_for_bit_as_alone(kv):
    """The same K/V, fed to a layer as a left-padded batch (with the position_ids generate makes) and row by row:
    identical stored tensors and identical returned K/V, prefill and decode, across several flushes."""

    method = KVMethod(parse_label(kv, group_size=32, residual_length=32),
                      inv_freq=1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32))
    torch.manual_seed(0)
    lengths, width, steps = (5, 37, 64), 64, 70
    full = [torch.randn(2, 1, 2, n + steps, 32) for n in lengths]  # keys, values of each row's real tokens
    batch = MixedPrecisionLayer(method)
    pads = [width - n for n in lengths]
    k = torch.stack([torch.nn.functional.pad(f[0, 0, :, :n], (0, 0, p, 0), value=math.nan)
                     for f, n, p in zip(full, lengths, pads)])
    v = torch.stack([torch.nn.functional.pad(f[1, 0, :, :n], (0, 0, p, 0), value=math.nan)
                     for f, n, p in zip(full, lengths, pads)])
    positions = torch.stack([(torch.arange(width) - p).clamp(min=0) for p in pads])
    got_k, _ = batch.update(k, v, kwargs={"position_ids": positions})
    alone = [MixedPrecisionLayer(method) for _ in lengths]
    for i, (layer, f, n, p) in enumerate(zip(alone, full, lengths, pads)):
        want_k, _ = layer.update(f[0, :, :, :n], f[1, :, :, :n])
        assert torch.equal(got_k[i, :, p:], want_k[0])
        assert not got_k[i, :, :p].isnan().any()  # the pads (NaN here) never enter storage nor come back
    for t in range(steps):
        step_k = torch.stack([f[0, 0, :, n + t : n + t + 1] for f, n in zip(full, lengths)])
        step_v = torch.stack([f[1, 0, :, n + t : n + t + 1] for f, n in zip(full, lengths)])
        got_k, got_v = batch.update(step_k, step_v)
        assert got_k.shape[-2] == width + t + 1
        for i, (layer, f, n, p) in enumerate(zip(alone, full, lengths, pads)):
            want_k, want_v = layer.update(f[0, :, :, n + t : n + t + 1], f[1, :, :, n + t : n + t + 1])
            assert torch.equal(got_k[i, :, p:], want_k[0]) and torch.equal(got_v[i, :, p:], want_v[0])
    for i, layer in enumerate(alone):
        assert layer.quantized_length >= 64
        assert_same_bytes(batch.rows[i].history, layer.history)
    assert batch.nbytes() == sum(layer.nbytes() for layer in alone)
    assert batch.get_seq_length() == width + steps and batch.get_mask_sizes(1) == (width + steps + 1, 0)


@pytest.mark.parametrize("backend,new_tokens,tolerance", [
    ("torch", NEW_TOKENS, 1e-4),
    pytest.param("native", NEW_TOKENS, 1e-4, marks=pytest.mark.skipif(
        not native_available(warn=False), reason="the C++ CPU decode kernel does not build here (g++ and ninja)")),
    ("triton", 8, 5e-3)])
def test_packed_attention_reads_each_padded_row(llama32, backend, new_tokens, tolerance, one_thread, monkeypatch,
                                                split_launches):
    """Inside use_packed_attention a ragged layer's steps read every row's packed history (no fallback, no warning,
    no dequantized history): the same tokens, logits equal to the torch path's up to the kernel's rounding (its
    Triton dot operands are fp16; Triton runs in its interpreter on CPU, so fewer steps; ``native`` is the C++
    kernel, what ``auto`` runs on CPU). Triton reads the whole batch in one launch a layer and step."""
    import warnings

    import kvtuner.cache.attention as attention

    config = KVConfig.uniform("K4V2", N_LAYERS, group_size=32, residual_length=32)
    inputs = left_padded(prompts())
    reference = generate(llama32, MixedPrecisionCache(config, llama32.config), inputs, max_new_tokens=new_tokens)
    cache = MixedPrecisionCache(config, llama32.config)
    rows = []
    kernel = attention.decode_attention_rows
    monkeypatch.setattr(attention, "decode_attention_rows",
                        lambda q, *a, **kw: rows.append(q.shape[0]) or kernel(q, *a, **kw))
    monkeypatch.setattr(MixedPrecisionLayer, "dequantized_history",  # (the prefill asks before anything is stored)
                        lambda self: None if self.history is None else pytest.fail("decode dequantized the history"))
    with warnings.catch_warnings(), use_packed_attention(llama32, cache, backend=backend), split_launches() as counted:
        warnings.simplefilter("error")
        out = generate(llama32, cache, inputs, max_new_tokens=new_tokens)
    launches = [grid[0] for grid, _ in counted]
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits, strict=True):
        assert (got - want).norm() / want.norm() < tolerance
    # every layer, every decode step, the batch's 3 rows (all have a history from the prefill: 37 and 50 tokens: 32)
    assert rows == [3] * (N_LAYERS * (new_tokens - 1))
    assert launches == ([3 * llama32.config.num_key_value_heads] * len(rows) if backend == "triton" else [])


def test_padding_declared_without_position_ids(llama32, one_thread, monkeypatch):
    """transformers before 5.18 passes the cache no position_ids: set_padding (the attention mask) gives the same
    rows; without it the batch is stored rectangular, pads included, as before."""
    import kvtuner.cache.layer as layer_module

    config = KVConfig.uniform("K4V2", N_LAYERS, group_size=32, residual_length=32)
    inputs = left_padded(prompts())
    learned = MixedPrecisionCache(config, llama32.config)
    reference = generate(llama32, learned, inputs, max_new_tokens=8)
    monkeypatch.setattr(layer_module, "position_ids_from", lambda args, kwargs: None)
    declared = MixedPrecisionCache(config, llama32.config)
    declared.set_padding(inputs["attention_mask"])
    out = generate(llama32, declared, inputs, max_new_tokens=8)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits))
    assert declared.layers[0].pads.tolist() == [27, 14, 0]
    untold = MixedPrecisionCache(config, llama32.config)
    generate(llama32, untold, inputs, max_new_tokens=8)
    assert untold.layers[0].rows is None and untold.layers[0].history.num_tokens == 64


def test_set_padding_takes_left_padding_only():
    cache = MixedPrecisionCache(KVConfig.uniform("K4V2", N_LAYERS, group_size=8, residual_length=8))
    with pytest.raises(ValueError, match="left padding"):
        cache.set_padding(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="has no token"):
        cache.set_padding(torch.tensor([[0, 0], [1, 1]]))
    cache.set_padding(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="2 rows of 4 tokens"):
        cache.update(torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8), 0)
    cache.layers[1].update(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    assert cache.layers[1].pads.tolist() == [1, 0]
    with pytest.raises(ValueError, match="new \\(or reset\\) cache"):
        cache.set_padding(torch.tensor([[0, 1, 1], [1, 1, 1]]))


def test_beam_search_on_a_padded_batch_matches_rows_alone(llama32, one_thread):
    """num_beams=2 repeats each row (batch_repeat_interleave) and reorders beams every step (reorder_cache): each
    row's best beam is the one that row finds alone, and beams share no storage."""
    config = KVConfig.uniform("K4V2", N_LAYERS, group_size=32, residual_length=32)
    rows = prompts()
    cache = MixedPrecisionCache(config, llama32.config)
    batch = generate(llama32, cache, left_padded(rows), num_beams=2, max_new_tokens=12)
    layer = cache.layers[0]
    assert len(layer.rows) == 6 and layer.pads.tolist() == [27, 27, 14, 14, 0, 0]
    buffers = [row._buffers[0].payload.data_ptr() for row in layer.rows if row._buffers is not None]
    assert len(buffers) == len(set(buffers))
    for i, row in enumerate(rows):
        alone = generate(llama32, MixedPrecisionCache(config, llama32.config), {"input_ids": row}, num_beams=2,
                         max_new_tokens=12)
        assert torch.equal(batch.sequences[i, max(LENGTHS):], alone.sequences[0, row.shape[1]:])


def test_select_crop_and_nbytes_of_a_padded_batch(llama32, one_thread):
    """nbytes is the sum of the rows alone (pads cost nothing); batch_select_indices keeps the chosen rows; a crop
    removes the same newest tokens from every row, into a row's pads too."""
    config = KVConfig.uniform("K4V2", N_LAYERS, group_size=32, residual_length=32)
    rows = prompts()
    cache = MixedPrecisionCache(config, llama32.config)
    inputs = left_padded(rows)
    with torch.no_grad():  # a forward pass of its own: position_ids as generate makes them tell the cache the pads
        llama32(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0),
                **cache_kwargs(llama32, cache))
        alone = []
        for row in rows:
            alone.append(MixedPrecisionCache(config, llama32.config))
            llama32(row, **cache_kwargs(llama32, alone[-1]))
    assert cache.nbytes() == sum(c.nbytes() for c in alone)
    cache.batch_select_indices(torch.tensor([0, 2]))
    layer = cache.layers[0]
    assert layer.pads.tolist() == [27, 0] and layer.rows[1].quantized_length == 64
    assert cache.nbytes() == alone[0].nbytes() + alone[2].nbytes()
    cache.crop(-30)  # 34 cache slots left: row 0 keeps 7 of its 37 tokens, row 1 34 of its 64
    assert cache.get_seq_length() == 34
    assert [r.get_seq_length() for r in layer.rows] == [7, 34]
    cache.crop(20)  # legacy absolute length, into row 0's pads
    assert [r.get_seq_length() for r in layer.rows] == [0, 20] and layer.pads.tolist() == [20, 0]
    keys, _ = layer.update(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32))
    assert keys.shape[-2] == 21 and not keys[0, :, :20].any()


def test_packed_rows_without_history_and_masks_hiding_more_than_pads(llama32, one_thread, monkeypatch):
    """A row whose tokens all sit in the residual attends to its residual alone; a step whose mask
    hides a real token as well takes the model's attention over the rows' full K/V (what the torch path does)."""
    import kvtuner.cache.attention as attention

    histories = []
    kernel = attention.decode_attention_rows
    monkeypatch.setattr(attention, "decode_attention_rows", lambda q, rows, *a, **kw: histories.append(
        [row[0] is not None for row in rows]) or kernel(q, rows, *a, **kw))
    config = KVConfig.uniform("K4V2", N_LAYERS, group_size=32, residual_length=32)
    rows = prompts((20, 45))  # the 20-token row stores nothing until its 32nd token
    inputs = left_padded(rows)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    logits = []
    for packed in (False, True):
        cache = MixedPrecisionCache(config, llama32.config)
        kw = cache_kwargs(llama32, cache)
        step_mask, out = mask, []
        with torch.no_grad(), use_packed_attention(llama32, cache, backend="torch") if packed else nullcontext():
            llama32(**inputs, position_ids=positions, **kw)
            for t in range(steps.shape[1]):
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
                if t == steps.shape[1] - 1:
                    step_mask[1, 30] = 0  # hides a real token of row 1: no longer just the pads
                position = positions[:, -1:] + t + 1
                out.append(llama32(steps[:, t : t + 1], attention_mask=step_mask, position_ids=position, **kw).logits)
        assert [row.quantized_length for row in cache.layers[0].rows] == [32, 32]
        logits.append(torch.cat(out, 1))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)
    # the kernel at steps 0-14 in both layers, row 0 with a history from step 12 on; step 15 fell back
    assert histories == [[False, True]] * (N_LAYERS * 12) + [[True, True]] * (N_LAYERS * 3)
