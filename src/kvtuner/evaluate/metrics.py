"""Quality metrics on next-token log-probabilities (pure tensor math).

All take log-probs ``[N, V]`` (rows are positions) and return sums, so chunks can be
accumulated exactly and averaged once at the end.
"""

from __future__ import annotations

import torch


KL_ROWS = 256  # rows per float64 step: bounds the [rows, V] temporaries (0.5 GB each at Gemma 3's 262k vocabulary)


def kl_sum(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Sum over rows of KL(P_ref || P): how far the quantized distribution drifts from full precision."""
    total = 0.0
    for start in range(0, ref_logprobs.shape[0], KL_ROWS):
        ref = ref_logprobs[start : start + KL_ROWS].double()
        total += float((ref.exp() * (ref - logprobs[start : start + KL_ROWS].double())).sum())
    return total


def top1_matches(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> int:
    """Rows whose most likely next token is the same as full precision's."""
    return int((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())


def nll_sum(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of negative log-likelihoods of ``targets`` ([N]) under ``logprobs`` ([N, V])."""
    return float(-logprobs.double().gather(-1, targets.unsqueeze(-1)).sum())
