"""Shared fixtures: tiny seeded random-weight models (fast, offline) and the real default model."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; the flag is read when triton is first imported,
    # which importing transformers' models already does, so it is set before anything else.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

DATA_DIR = Path(os.environ.get("KVTUNER_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WIKITEXT = DATA_DIR / "wikitext2_raw_test.txt"
GSM8K_TRAIN = DATA_DIR / "gsm8k_train.jsonl"

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _seeded(model_cls, config):
    torch.manual_seed(0)
    return model_cls(config).eval()


@contextmanager
def torch_threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def split_launches(monkeypatch):
    """``with split_launches() as launches``: every launch of the Triton decode kernel's split program inside the
    block, as (grid, keyword arguments), the kernel still running."""
    import kvtuner.kernels.decode as kd

    @contextmanager
    def counted():
        launches, kernel = [], kd._decode_split_kernel
        with monkeypatch.context() as mp:
            def launch(grid):
                return lambda *args, **kwargs: launches.append((grid, kwargs)) or kernel[grid](*args, **kwargs)

            mp.setattr(kd, "_decode_split_kernel",
                       type("Counted", (), {"__getitem__": lambda self, grid: launch(grid)})())
            yield launches

    return counted


@pytest.fixture
def one_thread():
    """Tiny tensors: with two threads on two shared cores, thread hand-offs cost more than the math."""
    with torch_threads(1):
        yield


@pytest.fixture
def two_threads():
    """Code that splits its work over threads (the C++ decode kernel) needs two to split at all."""
    with torch_threads(2):
        yield


@pytest.fixture(scope="session")
def tiny_llama():
    return _seeded(LlamaForCausalLM, LlamaConfig(**TINY))


@pytest.fixture(scope="session")
def packed_llama():
    """Head dim 32 and GQA 4, on the GPU where there is one: the shapes the packed decode kernels read."""
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512)
    return _seeded(LlamaForCausalLM, config).to("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_qwen2():
    """Qwen2 has QKV bias, the family KVTuner found sensitive to KV quantization."""
    return _seeded(Qwen2ForCausalLM, Qwen2Config(**TINY))


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per ASCII character (ids 0..127, the tiny models' vocabulary)."""
    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="\x03", pad_token="\x00")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama, tmp_path_factory):
    """``tiny_llama`` with the character tokenizer, saved as a folder ``kvtuner.models.load_model`` reads."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_llama.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory):
    """Wider than tiny_llama, so that a trial lasts long enough (tens of ms) to be caught running."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
    path = tmp_path_factory.mktemp("slow_model")
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct from its GGUF (skips if the package is missing)."""
    from kvtuner.models import ModelNotFoundError, load_model

    try:
        return load_model("default")
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"evaluation data not found at {WIKITEXT} (set KVTUNER_DATA to the folder of shared/data)")
    return WIKITEXT
