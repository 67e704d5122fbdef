"""Quality metrics on next-token log-probabilities (pure tensor math).

All take log-probs ``[N, V]`` (rows are positions) and return sums, so chunks can be
accumulated exactly and averaged once at the end.
"""

from __future__ import annotations

import torch


def kl_sum(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Sum over rows of KL(P_ref || P): how far the quantized distribution drifts from full precision."""
    ref = ref_logprobs.double()
    return float((ref.exp() * (ref - logprobs.double())).sum())


def top1_matches(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> int:
    """Rows whose most likely next token is the same as full precision's."""
    return int((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())


def nll_sum(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of negative log-likelihoods of ``targets`` ([N]) under ``logprobs`` ([N, V])."""
    return float(-logprobs.double().gather(-1, targets.unsqueeze(-1)).sum())
