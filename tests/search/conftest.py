"""Search-test fixtures: the repo-wide ``tiny_llama`` with a character tokenizer, saved as a loadable model
folder, and its profile on fixed random tokens."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvtuner.profile import ProfileSettings, profile_layers

G = 16  # tiny_llama has head_dim 16, so groups of 16
PAIRS = ("KV8", "K8V4", "K4V8", "K4V4", "K4V2", "K2V4", "K2V2")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per ASCII character (ids 0..127, the tiny model's vocabulary)."""
    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="\x03", pad_token="\x00")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_llama.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory):
    """Wider than tiny_llama, so that a trial lasts long enough (tens of ms) to be caught running."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
    path = tmp_path_factory.mktemp("slow_model")
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (1, 96), generator=g), torch.randint(0, 128, (1, 96), generator=g)


@pytest.fixture(scope="session")
def tiny_profile(tiny_llama, tiny_ids):
    torch.set_num_threads(1)
    return profile_layers(tiny_llama, tiny_ids[0], ProfileSettings(pairs=PAIRS, group_size=G, split_bits=None))
