import pytest
import torch


class _Poisoned:
    """Stands in for ``torch`` inside a launcher: fresh buffers start as NaN (floats) or all ones (ints),
    so a result that depends on memory the kernel never wrote fails the test."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    @staticmethod
    def empty_like(x):
        return _Poisoned.empty(x.shape, dtype=x.dtype, device=x.device)


@pytest.fixture
def poison_torch(monkeypatch):
    """``poison_torch(module)``: the module's ``torch`` hands out poisoned buffers for this test."""
    return lambda module: monkeypatch.setattr(module, "torch", _Poisoned())
