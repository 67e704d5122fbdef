import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
IMAGE_VERSION = "3.6.0"  # the GPU image's triton, installed by make test (see the Makefile)
IMAGE_TRITON = ROOT / ".venv" / "gluon-triton"


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


@pytest.fixture(scope="session")
def image_triton():
    """``image_triton(script, arg)``: run Python ``script`` (``sys.argv[1]`` the JSON of ``arg``) with the GPU image's
    triton first on the path, and return what it prints as JSON. What CI knows of how the GPU will compile a kernel:
    the project's own, newer triton runs the Triton kernels in its interpreter, which accepts code that the image's
    compiler refuses. Skips where that triton is not installed."""
    if not (IMAGE_TRITON / "triton" / "__init__.py").exists():
        pytest.skip(f"triton {IMAGE_VERSION} for the ahead-of-time checks is not installed at {IMAGE_TRITON} (make test installs it)")

    def run(script: str, arg) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # test modules set it
        env["PYTHONPATH"] = f"{IMAGE_TRITON}{os.pathsep}{ROOT / 'src'}"
        checked = f"import triton\nassert triton.__version__ == {IMAGE_VERSION!r}, triton.__version__\n{script}"
        done = subprocess.run([sys.executable, "-c", checked, json.dumps(arg)], capture_output=True, text=True,
                              env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    return run
