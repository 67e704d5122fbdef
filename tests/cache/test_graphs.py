"""Static decoding (``MixedPrecisionLayer.begin_static``) and ``GraphedDecoder``: the same tokens, codes and
logits as ``update``'s path, across flushes, with the step's work on fixed buffers and device-side counts.

On CPU the static steps run eagerly, through the Triton kernel in its interpreter (the path CUDA graphs
record) and through the torch backend (which reads the counts back); the graphs themselves are checked on a
GPU by the test marked ``gpu``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before importing them
pytest.importorskip("triton")


from kvtuner import KVConfig, LayerSpec, MixedPrecisionCache  # noqa: E402
from kvtuner.cache import cache_kwargs  # noqa: E402
from kvtuner.cache.attention import use_packed_attention  # noqa: E402
from kvtuner.cache.graphs import GraphedDecoder  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def model(packed_llama):
    return packed_llama


def prefilled(model, config, prompt):
    cache = MixedPrecisionCache(config, model.config)
    with torch.no_grad():
        model(prompt, **cache_kwargs(model, cache))
    return cache


def stored(cache):
    """Every layer's stored codes (the filled part) and residual tokens."""
    out = []
    for layer in cache.layers:
        out += [t.clone() for side in (layer.history.keys, layer.history.values) for t in side.codes.stored_tensors()]
        out += [layer.keys.clone(), layer.values.clone()]
    return out


@pytest.mark.parametrize("backend,kv,n_steps", [("triton", "K4V2", 13), ("torch", "K4V2", 45), ("torch", "K2V4", 45)])
def test_static_steps_match_update_across_flushes(model, backend, kv, n_steps):
    """A 150-token prompt (128 stored, 22 in the residual), then teacher-forced tokens, against update's path on the
    same backend: 13 cross one flush (the Triton kernel: the interpreter is slow off CUDA), 45 two."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 128, (2, 150), generator=g).to(DEVICE)
    steps = torch.randint(0, 128, (2, n_steps), generator=g).to(DEVICE)
    config = KVConfig.uniform(kv, 2, group_size=32, residual_length=32)
    ref_cache, cache = prefilled(model, config, prompt), prefilled(model, config, prompt)
    ref = []
    with torch.no_grad(), use_packed_attention(model, ref_cache, backend=backend):
        for i in range(steps.shape[1]):
            ref.append(model(steps[:, i : i + 1], **cache_kwargs(model, ref_cache)).logits[:, -1])
    got = []
    with GraphedDecoder(model, cache, max_length=256, backend=backend, graphs=False) as step:
        for i in range(steps.shape[1]):
            got.append(step(steps[:, i : i + 1]).clone())
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 150 + n_steps
    for a, b in zip(stored(cache), stored(ref_cache)):
        assert torch.equal(a, b)  # codes, scales and zeros bit for bit; the same residual tokens
    assert cache.nbytes() == ref_cache.nbytes()
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
    assert err < (1e-5 if backend == "torch" else 5e-3)  # the kernel's dot operands are fp16 on both paths
    after = []
    for c in (cache, ref_cache):  # update's path carries on from the same storage
        with torch.no_grad(), use_packed_attention(model, c, backend=backend):
            after.append(model(steps[:, :1], **cache_kwargs(model, c)).logits[:, -1])
    assert torch.equal(after[0], after[1])


def test_layers_static_decoding_cannot_read_are_refused_by_name(model):
    prompt = torch.randint(0, 128, (1, 150)).to(DEVICE)
    kivi = LayerSpec("kivi", 4, 4, 32, 32)
    for other, why in [(LayerSpec("kivi", 4, 4, 32, 32, sink=4), "sink"), (LayerSpec("kivi", 16, 16, 32, 32), "full-precision")]:
        cache = prefilled(model, KVConfig([kivi, other]), prompt)
        with pytest.raises(ValueError, match=f"layer 1: .*{why}"):
            GraphedDecoder(model, cache, max_length=256)
    short = prefilled(model, KVConfig([kivi, kivi]), prompt[:, :100])  # 96 stored tokens
    with pytest.raises(ValueError, match="96 stored tokens"):
        GraphedDecoder(model, short, max_length=256)
    cache = prefilled(model, KVConfig([kivi, kivi]), prompt)
    with pytest.raises(ValueError, match="no room"):
        GraphedDecoder(model, cache, max_length=150)


def test_a_full_cache_and_a_call_outside_the_context_are_clear_errors(model):
    cache = prefilled(model, KVConfig.uniform("K4V4", 2, group_size=32, residual_length=32),
                      torch.randint(0, 128, (1, 150)).to(DEVICE))
    decoder = GraphedDecoder(model, cache, max_length=152, backend="torch", graphs=False)  # (graphs need Triton)
    token = torch.zeros((1, 1), dtype=torch.long, device=DEVICE)
    with pytest.raises(RuntimeError, match="context manager"):
        decoder(token)
    with decoder as step:
        step(token)
        step(token)
        with pytest.raises(ValueError, match="cache is full"):
            step(token)
    assert cache.get_seq_length() == 152 and cache.layers[0].keys.shape[-2] == 152 - 128


def test_a_failed_step_leaves_the_decoder_usable_and_misuse_is_refused(model, monkeypatch):
    """A step that raises after some layers updated leaves the device counts as the host's; the model called
    directly, cache operations and a CPU cache asked for graphs are refused; a decoder can be entered again."""
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 128, (1, 150), generator=g).to(DEVICE)
    steps = torch.randint(0, 128, (1, 14), generator=g).to(DEVICE)
    config = KVConfig.uniform("K4V4", 2, group_size=32, residual_length=32)
    ref_cache, cache = prefilled(model, config, prompt), prefilled(model, config, prompt)
    with GraphedDecoder(model, ref_cache, max_length=256, backend="torch", graphs=False) as step:
        ref = torch.stack([step(steps[:, i : i + 1]).clone() for i in range(14)])
    decoder = GraphedDecoder(model, cache, max_length=256, backend="torch", graphs=False)
    got = []
    with decoder as step:
        got += [step(steps[:, i : i + 1]).clone() for i in range(5)]
        mlp = model.model.layers[1].mlp
        with monkeypatch.context() as m:  # layer 0 has updated when layer 1 fails
            m.setattr(mlp, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("boom")))
            with pytest.raises(RuntimeError, match="boom"):
                step(steps[:, 5:6])
        with pytest.raises(RuntimeError, match="call the decoder"):
            model(steps[:, 5:6], **cache_kwargs(model, cache))
        for layer in cache.layers:
            assert layer.static.lengths.tolist() == [layer.static.history_tokens, layer.static.residual_tokens]
        with pytest.raises(RuntimeError, match="static decoding"):
            cache.crop(-1)
        with pytest.raises(RuntimeError, match="static decoding"):
            cache.reorder_cache(torch.zeros(1, dtype=torch.long, device=DEVICE))
        got += [step(steps[:, i : i + 1]).clone() for i in range(5, 11)]  # across the flush at step 10
        static_bytes = cache.nbytes()
    assert cache.nbytes() == static_bytes  # what update's storage holds: 160 stored tokens, a 1-token residual
    with decoder as step:  # again, from update's storage
        got += [step(steps[:, i : i + 1]).clone() for i in range(11, 14)]
    assert torch.equal(torch.stack(got), ref)
    with pytest.raises(ValueError, match="graphs need a CUDA cache"):
        GraphedDecoder(model, cache, max_length=256, backend="torch", graphs=True)


def test_reset_leaves_static_decoding(model):
    cache = prefilled(model, KVConfig.uniform("K4V4", 2, group_size=32, residual_length=32),
                      torch.randint(0, 128, (1, 150)).to(DEVICE))
    with GraphedDecoder(model, cache, max_length=200, backend="torch", graphs=False):
        cache.reset()
        assert all(layer.static is None for layer in cache.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replays_match_eager_static_steps_and_update(model):
    """Recorded graphs (a plain and a flushing step) replayed across three flushes give the eager static steps'
    logits and codes exactly, and update's packed path's codes exactly and logits to the kernel's rounding; a
    second entry records its graphs anew."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 128, (3, 170), generator=g).to(DEVICE)
    steps = torch.randint(0, 128, (3, 100), generator=g).to(DEVICE)
    config = KVConfig.uniform("K4V2", 2, group_size=32, residual_length=32)
    eager, graphed, packed = (prefilled(model, config, prompt) for _ in range(3))
    out = {}
    for name, cache, graphs in (("eager", eager, False), ("graphs", graphed, True)):
        decoder = GraphedDecoder(model, cache, max_length=300, graphs=graphs)
        with decoder as step:
            out[name] = [step(steps[:, i : i + 1]).clone() for i in range(70)]
            if graphs:
                assert len(decoder._recorded) == 2
        with decoder as step:
            out[name] += [step(steps[:, i : i + 1]).clone() for i in range(70, 100)]
    with torch.no_grad(), use_packed_attention(model, packed, backend="triton"):
        out["update"] = [model(steps[:, i : i + 1], **cache_kwargs(model, packed)).logits[:, -1] for i in range(100)]
    assert torch.equal(torch.stack(out["eager"]), torch.stack(out["graphs"]))
    for a, b, c in zip(stored(eager), stored(graphed), stored(packed)):
        assert torch.equal(a, b) and torch.equal(a, c)
    ref = torch.stack(out["update"])
    assert ((torch.stack(out["graphs"]) - ref).norm() / ref.norm()).item() < 5e-3
