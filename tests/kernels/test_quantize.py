"""Triton quantize-and-pack against kvtuner.quant.quantize: bit-exact, every output word written.

Runs the kernels compiled on CUDA, else in Triton's interpreter on the CPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before importing them
pytest.importorskip("triton")

import kvtuner.kernels.quantize_pack as kq  # noqa: E402
from kvtuner import kernels  # noqa: E402
from kvtuner.quant import NonFiniteError, QuantSpec, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned(poison_torch):
    poison_torch(kq)


def assert_same(a, b):
    assert a.shape == b.shape and a.spec == b.spec
    assert torch.equal(a.payload, b.payload)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("axis,tokens", [("channel", 96), ("token", 77)])
def test_bit_exact_with_reference(bits, axis, tokens):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, tokens, 128, generator=g) * 2 + 0.5).to(DEVICE, torch.bfloat16)
    x[0, 0, :, 5] = 1.25  # a constant channel, and for the token axis a constant group
    x[1, 2, 3, :32] = -0.5
    spec = QuantSpec(bits, 32, axis)
    assert_same(kernels.quantize(x, spec, backend="triton"), quantize(x, spec))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("group", [16, 64])
def test_dtypes_groups_and_strided_input(dtype, group):
    g = torch.Generator().manual_seed(group)
    full = torch.randn(1, 2, 160, 64, generator=g).to(DEVICE, dtype)
    x = full[..., 16:144, :]  # a strided view, as the layer's residual slice is
    for spec in (QuantSpec(4, group, "channel"), QuantSpec(2, min(group, 64), "token")):
        assert_same(kernels.quantize(x, spec, backend="triton"), quantize(x, spec))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_bit_exact_on_offset_narrow_groups(axis, bits, scale_dtype):
    """Groups far from zero with a narrow range, where the zero rounds down and the scale up: rows
    at offsets from 1e-4 to 3e4 either sign, spans 1e-2 to 1e-6 of the offset."""
    g = torch.Generator().manual_seed(bits)
    offset = torch.tensor([1e-4, -0.3, 100.0, -1000.0, 3e4, -2e4]).reshape(2, 3, 1, 1)
    span = 10.0 ** -torch.randint(2, 7, (2, 3, 64, 1), generator=g)
    x = (offset + offset.abs() * span * torch.randn(2, 3, 64, 64, generator=g)).to(DEVICE)
    spec = QuantSpec(bits, 32, axis, scale_dtype=scale_dtype)
    ref = quantize(x, spec)
    assert_same(kernels.quantize(x, spec, backend="triton"), ref)
    if scale_dtype != torch.float32:  # the data reach both directed steps: off the nearest value
        red = -1 if axis == "token" else -2
        groups = x.float().unflatten(red, (-1, 32))
        lo, hi = groups.amin(red), groups.amax(red)
        assert (ref.zero != lo.to(scale_dtype)).any()
        assert (ref.scale != ((hi - ref.zero.float()) / (2**bits - 1)).to(scale_dtype)).any()


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # numpy, interpreting
def test_non_finite_and_unrepresentable_input_raise():
    spec = QuantSpec(4, 32, "channel")
    x = torch.randn(1, 2, 32, 64, device=DEVICE)
    x[0, 1, 3, 7] = float("nan")  # one NaN in a group: a group min/max may skip it, the launcher may not
    with pytest.raises(NonFiniteError, match="1 NaN and 0 Inf of 4096 elements"):
        kernels.quantize(x, spec, backend="triton")
    x[0, 1, 3, 7] = -1e5
    with pytest.raises(ValueError, match="beyond the largest torch.float16"):
        kernels.quantize(x, spec, backend="triton")
    spec = QuantSpec(4, 32, "channel", scale_dtype=torch.bfloat16)
    assert_same(kernels.quantize(x, spec, backend="triton"), quantize(x, spec))


def test_forcing_triton_on_unsupported_spec_raises():
    x = torch.randn(1, 1, 32, 128, device=DEVICE)
    with pytest.raises(ValueError, match="does not support"):
        kernels.quantize(x, QuantSpec(4, 32, "token", symmetric=True), backend="triton")
    assert kernels.quantize(x, QuantSpec(4, 32, "token", symmetric=True)).spec.symmetric  # auto: torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_selects_triton_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(kq, "quantize_triton", lambda x, spec: calls.append(spec) or quantize(x, spec))
    spec = QuantSpec(4, 32, "channel")
    kernels.quantize(torch.randn(1, 1, 32, 128, device="cuda"), spec)
    kernels.quantize(torch.randn(1, 1, 32, 128), spec)
    assert calls == [spec]
