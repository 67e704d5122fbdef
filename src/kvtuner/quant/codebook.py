"""Non-uniform quantization levels (KVQuant's NUQ) inside grouped min/max quantization.

A group is normalized as usual, ``y = (x - zero) / scale`` in ``[0, qmax]``; uniform
quantization rounds ``y`` to an integer, NUQ picks the nearest of ``2**bits`` calibrated levels
and stores its index. The levels are fitted offline on normalized calibration activations with
weighted 1-D k-means (weights: a sensitivity proxy, see :mod:`kvtuner.profile.calibrate`), so
they crowd where the values and the loss's sensitivity are. The two end levels stay pinned at
0 and ``qmax``: every group's min and max remain exact, which matters because min/max
normalization puts an element on each end of every group, and k-means centroids (interior by
construction) would clip exactly those extremes, usually the outliers that count.

Storage is the grouped layout of :mod:`kvtuner.quant.tensor` unchanged (packed indices, fp16
scale and zero); the levels are one small table per layer and side.
"""

from __future__ import annotations

import torch


def uniform_levels(bits: int) -> torch.Tensor:
    return torch.arange(2**bits, dtype=torch.float32)


def nearest_level(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each ``y`` (levels sorted ascending; ties go up)."""
    levels = levels.to(device=y.device, dtype=torch.float32)
    midpoints = ((levels[1:] + levels[:-1]) / 2).contiguous()
    return torch.searchsorted(midpoints, y.float().contiguous(), right=True)


def fit_levels(y: torch.Tensor, weights: torch.Tensor, bits: int, iterations: int = 100) -> torch.Tensor:
    """Weighted 1-D k-means over normalized values ``y`` in ``[0, 2**bits - 1]``, end levels pinned.

    y, weights: 1-D (weights >= 0, zero weight ignored). Starts from the uniform grid (the
    integer levels), so a fit never does worse than uniform on its own weighted objective:
    each Lloyd step lowers it. Returns ``2**bits`` sorted float32 levels.
    """
    if y.shape != weights.shape or y.dim() != 1:
        raise ValueError("fit_levels takes 1-D values and weights of one shape")
    if not torch.isfinite(y).all() or not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("fit_levels needs finite values and non-negative finite weights")
    qmax = 2**bits - 1
    y = y.double().clamp(0, qmax)
    w = weights.double()
    levels = uniform_levels(bits).double()
    for _ in range(iterations):
        idx = nearest_level(y, levels)
        num = torch.zeros_like(levels).scatter_add_(0, idx, w * y)
        den = torch.zeros_like(levels).scatter_add_(0, idx, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), levels)
        new[0], new[-1] = 0.0, float(qmax)
        new = new.sort().values
        if torch.allclose(new, levels, rtol=0, atol=1e-7):
            levels = new
            break
        levels = new
    return levels.float()


def weighted_error(y: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor) -> float:
    """Weighted squared error of snapping ``y`` to ``levels`` (the objective :func:`fit_levels` lowers)."""
    snapped = levels.double()[nearest_level(y, levels)]
    return float((weights.double() * (y.double() - snapped) ** 2).sum())
