"""The search space: per-layer Pareto pruning, then layer groups that share one choice.

Two reductions from KVTuner (Li et al., 2025), both on the measured single-layer losses:

* intra-layer pruning: a candidate is dropped from a layer when another candidate costs no
  more bits and loses no more quality there (Pareto dominance); an optimal config never needs it.
* inter-layer clustering: layers whose log-loss profiles are alike (hierarchical Ward
  clustering) form a group that takes one candidate; the group's options are then pruned again
  on the group's summed loss.

Space sizes are products over layers (groups) of the options left; they are exact integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from kvtuner.config import KVConfig, LayerSpec, ModelFingerprint

LOSS_FLOOR = 1e-9  # KL below this is float noise; keeps log10 finite


def dominates(cost: np.ndarray, j: int, i: int) -> bool:
    """Whether option ``j`` costs no more than ``i`` in every row of ``cost`` ``[costs, C]``."""
    return bool(np.all(cost[:, j] <= cost[:, i]))


def pareto_options(cost: np.ndarray, loss: np.ndarray) -> list[int]:
    """Indices of the non-dominated options, cheapest (in the first cost) first.

    cost: ``[C]``, or ``[costs, C]`` for several costs at once (nominal bits and real bytes: a
    budget may limit either). ``j`` dominates ``i`` when it costs no more in every cost and loses
    no more, strictly better in one of them; of exact ties the first index stays.
    """
    cost = np.atleast_2d(cost)
    keep = []
    for i in range(cost.shape[1]):
        dominated = any(
            dominates(cost, j, i) and loss[j] <= loss[i]
            and (np.any(cost[:, j] < cost[:, i]) or loss[j] < loss[i] or j < i)
            for j in range(cost.shape[1])
            if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (*cost[:, i], loss[i]))


def cluster_layers(loss: np.ndarray, groups: int | None) -> list[list[int]]:
    """Partition layers into at most ``groups`` groups of alike log10-loss vectors (rows of ``loss``).

    ``None`` or at least as many groups as layers: one group per layer. Groups are ordered by
    their first layer.
    """
    layers = loss.shape[0]
    if groups is None or groups >= layers:
        return [[i] for i in range(layers)]
    if groups < 1:
        raise ValueError(f"groups must be at least 1, not {groups}")
    if groups == 1:
        return [list(range(layers))]
    features = np.log10(np.maximum(loss, LOSS_FLOOR))
    labels = fcluster(linkage(features, method="ward"), t=groups, criterion="maxclust")
    members: dict[int, list[int]] = {}
    for layer, label in enumerate(labels):
        members.setdefault(int(label), []).append(layer)
    return sorted(members.values(), key=lambda m: m[0])


@dataclass
class Group:
    """Layers that share one candidate, and the candidate indices left for them."""

    layers: list[int]
    options: list[int]


@dataclass
class SearchSpace:
    """The candidates and the groups over layers: a point of the space is one candidate per group."""

    candidates: list[LayerSpec]
    groups: list[Group]
    num_layers: int

    @property
    def labels(self) -> list[str]:
        return [spec.label for spec in self.candidates]

    @property
    def size(self) -> int:
        return math.prod(len(g.options) for g in self.groups)

    def layer_choice(self, group_choice: list[int]) -> list[int]:
        """Candidate index per layer from a candidate index per group."""
        per_layer = [0] * self.num_layers
        for group, c in zip(self.groups, group_choice):
            for layer in group.layers:
                per_layer[layer] = c
        return per_layer

    def config(self, layer_choice: list[int], model: ModelFingerprint | None = None, name: str = "") -> KVConfig:
        return KVConfig([self.candidates[c] for c in layer_choice], model=model, name=name)

    def describe(self) -> dict[str, Any]:
        return {
            "candidates": self.labels,
            "groups": [{"layers": g.layers, "options": [self.labels[c] for c in g.options]} for g in self.groups],
        }


@dataclass
class SpaceReport:
    """Search-space sizes along the reductions (exact integers)."""

    full: int
    pruned: int
    clustered: int
    pruned_options: list[list[int]]  # per layer

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {"exact": str(value), "log10": round(math.log10(value), 3)}
            for name, value in (("full", self.full), ("pruned", self.pruned), ("clustered", self.clustered))
        }


def layer_costs(cost: np.ndarray, layers: int) -> np.ndarray:
    """``[L, costs, C]``: each layer's own costs. A cost shared by all layers (``[C]`` or ``[costs, C]``) is
    repeated; per-layer costs differ where layers store differently many tokens (sliding windows at a context)."""
    cost = np.asarray(cost, dtype=float)
    if cost.ndim == 3:
        return cost
    return np.broadcast_to(np.atleast_2d(cost), (layers, *np.atleast_2d(cost).shape))


def group_cost(cost: np.ndarray, members: list[int]) -> np.ndarray:
    """``[costs, C]``: what a group of layers costs when all of them take candidate ``c`` (``cost`` ``[L, costs, C]``)."""
    return cost[members].sum(axis=0)


def build_space(
    candidates: list[LayerSpec], loss: np.ndarray, cost: np.ndarray, groups: int | None
) -> tuple[SearchSpace, SpaceReport]:
    """Prune each layer, cluster the layers, prune each group; return the space and its sizes.

    cost: ``[C]`` or ``[costs, C]`` shared by all layers, or ``[L, costs, C]`` per layer (:func:`layer_costs`).
    """
    layers, n = loss.shape
    cost = layer_costs(cost, layers)
    pruned = [pareto_options(cost[layer], loss[layer]) for layer in range(layers)]
    clusters = cluster_layers(loss, groups)
    space_groups = [Group(members, pareto_options(group_cost(cost, members), loss[members].sum(axis=0)))
                    for members in clusters]
    space = SearchSpace(candidates, space_groups, layers)
    report = SpaceReport(
        full=n**layers,
        pruned=math.prod(len(p) for p in pruned),
        clustered=space.size,
        pruned_options=pruned,
    )
    return space, report
