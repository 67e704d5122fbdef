"""Per-layer attention statistics behind KVTuner's sensitivity analysis (pure tensor math).

Inputs are one layer's full-precision query ``[B, H, T, D]`` and post-RoPE key / value
``[B, H_kv, T, D]``. KVTuner (Li et al., 2025) ranks layers by the relative error of the
attention output, ``e_o = ||O_q - O|| / ||O||``, a cheap stand-in for the end-to-end loss; the
profile reports it beside the measured KL so the two can be compared. Entropy and the largest
attention weight describe how concentrated a layer's attention is (concentrated heads magnify
key errors: a small shift of one score moves most of the mass), and the outlier ratios show
the fixed outlier channels of keys that KIVI's per-channel key groups absorb.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtuner.method import KVMethod
from kvtuner.profile.blockwise import decode_faithful_attention


def output_error(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    method: KVMethod,
    scaling: float,
    reference: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> float:
    """KVTuner's e_o: relative Frobenius error of the attention output when decoding with ``method``."""
    if reference is None:
        reference = decode_faithful_attention(query, key, value, None, scaling, sliding_window)
    quantized = decode_faithful_attention(query, key, value, method, scaling, sliding_window)
    return float((quantized - reference).norm() / reference.norm())


def attention_concentration(query: torch.Tensor, key: torch.Tensor, scaling: float,
                            sliding_window: int | None = None) -> tuple[float, float]:
    """(mean entropy in nats, mean largest weight) of the causal attention rows (within ``sliding_window``, if
    given), over heads and queries.

    One query head at a time, so memory stays at one ``[T, T]`` score matrix.
    """
    group = query.shape[1] // key.shape[1]
    length = query.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    if sliding_window is not None:
        causal = causal.triu(-(sliding_window - 1))
    entropy = top = 0.0
    heads = 0
    for b in range(query.shape[0]):
        for h in range(query.shape[1]):
            scores = (query[b, h] @ key[b, h // group].transpose(0, 1)) * scaling
            logp = F.log_softmax(scores.float().masked_fill(~causal, float("-inf")), dim=-1)
            p = logp.exp()
            entropy += float(-(p * logp.masked_fill(~causal, 0.0)).sum(-1).mean())
            top += float(p.amax(-1).mean())
            heads += 1
    return entropy / heads, top / heads


def channel_outlier_ratio(x: torch.Tensor) -> float:
    """Largest per-channel absolute maximum over the median one (``x`` ``[..., T, D]``).

    Large for keys, whose outliers sit in a few fixed channels; near 1 when no channel stands out.
    """
    per_channel = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
    return float(per_channel.max() / per_channel.median().clamp_min(1e-12))


def layer_statistics(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     sliding_window: int | None = None) -> dict[str, float]:
    """The per-layer numbers the profile reports beside the loss."""
    entropy, top = attention_concentration(query, key, scaling, sliding_window)
    return {
        "entropy": entropy,
        "max_weight": top,
        "k_absmax": float(key.abs().max()),
        "v_absmax": float(value.abs().max()),
        "k_outlier": channel_outlier_ratio(key),
        "v_outlier": channel_outlier_ratio(value),
    }
