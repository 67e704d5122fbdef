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
scale and zero); the levels are one small table per layer and side. KVQuant's own layout
normalizes keys by a range calibrated offline instead of per group: there the ends of the range
are rare quantiles, not group extremes, so those tables (one per channel) keep free ends
(:func:`fit_levels`'s ``pin_ends``).
"""

from __future__ import annotations

import torch


def uniform_levels(bits: int) -> torch.Tensor:
    return torch.arange(2**bits, dtype=torch.float32)


def level_grid(bits: int) -> int:
    """Grid points per code step that shared level tables live on: the largest power of two with
    ``qmax * grid <= 127`` (8 at 4 bits, 16 at 3, 32 at 2).

    Why: the decode kernel looks a code's level up as one 7-bit byte ``level * grid`` (a byte permute
    selects four at once) and turns it into fp16 with the ``0x6400`` magic number; a power of two keeps
    every grid point exact in fp16. The grid costs at most half a grid step (1/16 of a code step at 4
    bits) and keeps the pinned ends 0 and ``qmax`` exact.
    """
    return 2 ** (7 - bits)  # = 128 / entries


def snap_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """``levels`` clamped to ``[0, qmax]`` and rounded to the :func:`level_grid` of ``bits`` (fp16: every
    grid point is exact in it)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"level tables on the kernel's grid have 2, 3 or 4 bits, not {bits}")
    grid = level_grid(bits)
    return (torch.round(levels.float().clamp(0, 2**bits - 1) * grid) / grid).to(torch.float16)


def nearest_level(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each ``y`` (levels sorted ascending; ties go up).

    levels ``[K]`` serves any ``y``; levels ``[..., K]`` (one table per row, e.g. per channel)
    takes ``y`` ``[..., N]`` with the same leading dims.
    """
    levels = levels.to(device=y.device, dtype=torch.float32)
    midpoints = ((levels[..., 1:] + levels[..., :-1]) / 2).contiguous()
    return torch.searchsorted(midpoints, y.float().contiguous(), right=True)


def fit_levels(y: torch.Tensor, weights: torch.Tensor, bits: int, iterations: int = 100,
               pin_ends: bool = True) -> torch.Tensor:
    """Weighted 1-D k-means over normalized values ``y`` in ``[0, 2**bits - 1]``.

    y, weights: ``[N]``, or ``[..., N]`` for one fit per row (weights >= 0, zero weight ignored).
    pin_ends: keep the end levels at 0 and ``qmax``, right where every group has an element at
    each end (min/max normalization). A range calibrated offline instead has its ends at rare
    quantiles, and pinned ends would spend two of the levels (half of them at 2 bits) on a
    percent of the values: there the ends are free and the fit starts from the weighted data's
    quantiles. Pinned, it starts from the uniform grid, so it never does worse than uniform on
    its own weighted objective (each Lloyd step lowers it). Returns sorted float32 levels
    ``[2**bits]`` (``[..., 2**bits]`` for rows).
    """
    if y.shape != weights.shape or y.dim() < 1:
        raise ValueError("fit_levels takes values and weights of one shape, at least 1-D")
    if not torch.isfinite(y).all() or not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("fit_levels needs finite values and non-negative finite weights")
    qmax = 2**bits - 1
    y = y.double().clamp(0, qmax)
    w = weights.double()
    if pin_ends:
        levels = uniform_levels(bits).double().expand(*y.shape[:-1], 2**bits).contiguous()
    else:
        levels = _weighted_quantiles(y, w, (torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2**bits)
    for _ in range(iterations):
        idx = nearest_level(y, levels)
        num = torch.zeros_like(levels).scatter_add_(-1, idx, w * y)
        den = torch.zeros_like(levels).scatter_add_(-1, idx, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), levels)
        if pin_ends:
            new[..., 0], new[..., -1] = 0.0, float(qmax)
        new = new.sort(dim=-1).values
        done = torch.allclose(new, levels, rtol=0, atol=1e-7)
        levels = new
        if done:
            break
    return levels.float()


def _weighted_quantiles(y: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles ``q`` of each row of ``y`` under weights ``w`` (``[..., N]`` -> ``[..., len(q)]``)."""
    order = y.argsort(dim=-1)
    ys, ws = y.gather(-1, order), w.gather(-1, order)
    cum = ws.cumsum(-1)
    total = cum[..., -1:].clamp_min(1e-300)
    idx = torch.searchsorted(cum / total, q.to(y.dtype).expand(*y.shape[:-1], len(q)).contiguous())
    return ys.gather(-1, idx.clamp_max(y.shape[-1] - 1))


def weighted_error(y: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor) -> float:
    """Weighted squared error of snapping ``y`` to ``levels`` (the objective :func:`fit_levels` lowers)."""
    snapped = levels.double().expand(*y.shape[:-1], levels.shape[-1]).gather(-1, nearest_level(y, levels)) \
        if levels.dim() > 1 else levels.double()[nearest_level(y, levels)]
    return float((weights.double() * (y.double() - snapped) ** 2).sum())
