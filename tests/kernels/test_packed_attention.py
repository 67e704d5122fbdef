"""``use_packed_attention``: decode steps on packed storage match the reference cache path.

A tiny Llama (head_dim 32, GQA 4) decodes teacher-forced tokens across residual flushes, once
with the reference (dequantize + SDPA) and once per backend with the packed decode path; the
packed path must never dequantize the history.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before importing them
pytest.importorskip("triton")

from transformers import AttentionInterface  # noqa: E402

from kvtuner import KVConfig, MixedPrecisionCache  # noqa: E402
from kvtuner.cache import cache_kwargs  # noqa: E402
from kvtuner.cache.attention import use_packed_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 model: the torch path matches to rounding; the kernel's dot operands are fp16
TOL = {"torch": 1e-5, "triton": 5e-3}


@pytest.fixture
def model(packed_llama):
    return packed_llama


def run(model, cache, prompt, steps, mask=None):
    """Prefill ``prompt`` [B, T], then one token at a time through ``steps`` [B, N]: logits [N, B, V]."""
    kw = cache_kwargs(model, cache)
    logits = []
    with torch.no_grad():
        model(prompt, attention_mask=mask, **kw)
        for i in range(steps.shape[1]):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits.append(model(steps[:, i : i + 1], attention_mask=mask, **kw).logits[:, -1])
    return torch.stack(logits)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kv", ["K4V2", "K8V4"])
def test_decode_matches_reference_across_flushes(model, backend, kv, monkeypatch):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128, (2, 37), generator=g).to(DEVICE)
    steps = torch.randint(0, 128, (2, 14), generator=g).to(DEVICE)  # residual 5 -> 16 flushes at step 11
    config = KVConfig.uniform(kv, 2, group_size=16, residual_length=16)
    ref = run(model, MixedPrecisionCache(config, model.config), prompt, steps)

    cache = MixedPrecisionCache(config, model.config)
    before = model.config._attn_implementation
    with use_packed_attention(model, cache, backend=backend):
        model(prompt, **cache_kwargs(model, cache))  # prefill runs on the reference path
        for layer in cache.layers:
            monkeypatch.setattr(layer, "dequantized_history", lambda: pytest.fail("decode dequantized the history"))
        kw = cache_kwargs(model, cache)
        with torch.no_grad():
            out = torch.stack([model(steps[:, i : i + 1], **kw).logits[:, -1] for i in range(steps.shape[1])])
    assert rel(out, ref) < TOL[backend]
    assert model.config._attn_implementation == before
    assert not any(name.startswith("kvtuner_packed") for name in AttentionInterface._global_mapping)


def test_padded_batch_falls_back_to_full_attention(model):
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 128, (2, 21), generator=g).to(DEVICE)
    steps = torch.randint(0, 128, (2, 4), generator=g).to(DEVICE)
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # left padding on the second row
    config = KVConfig.uniform("K4V4", 2, group_size=16, residual_length=16)
    ref = run(model, MixedPrecisionCache(config, model.config), prompt, steps, mask)
    cache = MixedPrecisionCache(config, model.config)
    with use_packed_attention(model, cache, backend="triton"):
        out = run(model, cache, prompt, steps, mask)
    assert rel(out, ref) < TOL["torch"]


def test_layers_the_kernel_cannot_read_stay_on_the_torch_path_with_one_warning(model):
    """A sink and pre-RoPE keys: the kernel does not read them, so those layers decode as the reference, said once."""
    from kvtuner.config import LayerSpec, parse_label

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 128, (1, 37), generator=g).to(DEVICE)
    steps = torch.randint(0, 128, (1, 6), generator=g).to(DEVICE)
    config = KVConfig([parse_label("KV4+sink1+prerope", 16, 16), LayerSpec("kivi", 4, 4, 16, 16)])
    ref = run(model, MixedPrecisionCache(config, model.config), prompt, steps)
    cache = MixedPrecisionCache(config, model.config)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) with options the packed decode kernel does not read \(KV4\+sink1\+prerope\)"):
        with use_packed_attention(model, cache, backend="torch"):
            out = run(model, cache, prompt, steps)
    assert cache.layers[0].packed_decode is False
    assert rel(out, ref) < TOL["torch"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_codebook_and_sink_layers_decode_on_the_kernel(model, backend, monkeypatch):
    """Codebooks with sinks of 1 and 3 tokens on both layers: no warning, no dequantized history, the
    reference's logits."""
    import warnings

    from kvtuner.cache.mixed import fingerprint
    from kvtuner.config import parse_label
    from kvtuner.method import Calibration, levels_key

    specs = [parse_label("K4V2+sink1+nuq", 16, 16), parse_label("K2V4+sink3+nuq", 16, 16)]
    levels = {levels_key(s, side): [(2**bits - 1) * torch.linspace(0, 1, 2**bits) ** power] * 2
              for s in specs for side, bits, power in (("k", s.k_bits, 1.5), ("v", s.v_bits, 0.7))}
    calibration = Calibration(fingerprint(model.config), {k: [t.half() for t in v] for k, v in levels.items()})
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 128, (2, 37), generator=g).to(DEVICE)
    steps = torch.randint(0, 128, (2, 14), generator=g).to(DEVICE)
    config = KVConfig(specs)
    ref = run(model, MixedPrecisionCache(config, model.config, calibration=calibration), prompt, steps)
    cache = MixedPrecisionCache(config, model.config, calibration=calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with use_packed_attention(model, cache, backend=backend):
            model(prompt, **cache_kwargs(model, cache))
            for layer in cache.layers:
                monkeypatch.setattr(layer, "dequantized_history", lambda: pytest.fail("decode dequantized the history"))
            kw = cache_kwargs(model, cache)
            with torch.no_grad():
                out = torch.stack([model(steps[:, i : i + 1], **kw).logits[:, -1] for i in range(steps.shape[1])])
    assert cache.layers[1].history.sink_keys.shape[-2] == 3
    assert rel(out, ref) < TOL[backend]
