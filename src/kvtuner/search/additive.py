"""The additive model: a config's loss predicted as the sum of its layers' single-layer losses.

Under that model the best config for a size budget is a multiple-choice knapsack: pick one
candidate per unit (a layer, or a group of layers sharing a candidate) to minimise the summed
loss with the summed size under the budget. It is solved exactly as a small integer program
with ``scipy.optimize.milp`` (HiGHS), as NVIDIA ModelOpt's KV AutoQuant does for its per-layer
formats; a few hundred binaries take well under a second. The measured search then corrects
what the model misses (layer interactions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


def predicted_loss(loss: np.ndarray, layer_choice: Sequence[int]) -> float:
    """Sum over layers of ``loss[layer, candidate]``."""
    return float(sum(loss[layer, c] for layer, c in enumerate(layer_choice)))


def solve_knapsack(
    unit_loss: np.ndarray,
    allowed: Sequence[Sequence[int]],
    weight: Sequence[int],
    limits: Sequence[tuple[np.ndarray, float]],
) -> list[int] | None:
    """Exact minimiser of the additive loss under size limits; None when no choice fits.

    unit_loss ``[U, C]``: loss of unit ``u`` taking candidate ``c`` (already summed over its layers).
    allowed: candidate indices open to each unit. weight: layers in each unit.
    limits: ``(cost, limit)`` pairs meaning ``sum_u weight[u] * cost[c_u] <= limit`` for a cost ``[C]`` per layer
    alike, or ``sum_u cost[u, c_u] <= limit`` for a cost ``[U, C]`` of each unit's own (already summed over its layers).
    """
    index = [(u, c) for u, options in enumerate(allowed) for c in options]
    n = len(index)
    objective = np.array([unit_loss[u, c] for u, c in index])
    one_each = np.zeros((len(allowed), n))
    for i, (u, _) in enumerate(index):
        one_each[u, i] = 1.0
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    for cost, limit in limits:
        cost = np.asarray(cost)
        row = np.array([[cost[u, c] if cost.ndim == 2 else weight[u] * cost[c] for u, c in index]])
        constraints.append(LinearConstraint(row, -np.inf, limit))
    result = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.status != 0 or result.x is None:
        return None
    choice = [-1] * len(allowed)
    for i, (u, c) in enumerate(index):
        if result.x[i] > 0.5:
            choice[u] = c
    return choice
