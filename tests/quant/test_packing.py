import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtuner.quant import PACKABLE_BITS, pack, packed_width, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(PACKABLE_BITS), rows=st.integers(1, 4), length=st.integers(1, 97), seed=st.integers(0, 2**31))
def test_pack_unpack_is_identity(bits, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, length), generator=g).to(torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, packed_width(length, bits))
    assert torch.equal(unpack(words, bits, length), codes)


@pytest.mark.parametrize("bits,length,words", [(1, 64, 2), (2, 64, 4), (3, 64, 6), (4, 64, 8), (8, 64, 16), (4, 65, 9), (3, 10, 2)])
def test_packed_width_is_dense(bits, length, words):
    # 64 codes: 1 bit -> 2 words, 3 bits -> 4 + 2 words = 24 bytes = exactly 3 bits a code
    assert packed_width(length, bits) == words


def test_known_layout():
    # code i of a row sits at bit offset bits * (i % cpw) of word i // cpw, little end first
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]], dtype=torch.uint8)
    words = pack(codes, 4)
    assert words[0, 0].item() == int("f7654321", 16) - 2**32  # top nibble set: negative as int32
    assert words[0, 1].item() == 9


@pytest.mark.parametrize("bits", [0, 5, 16])
def test_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="supported"):
        pack(torch.zeros(1, 4, dtype=torch.uint8), bits)
