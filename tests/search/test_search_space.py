import itertools
import math

import numpy as np
import pytest

from kvtuner.profile import candidate_specs
from kvtuner.search import build_space, cluster_layers, pareto_options, solve_knapsack


def test_pareto_drops_dominated_and_ties():
    cost = np.array([8.0, 6.0, 6.0, 4.0, 4.0, 3.0])
    loss = np.array([1.0, 2.0, 5.0, 3.0, 3.0, 9.0])
    # 2 is dominated by 1 (same bits, more loss); 4 ties 3 exactly (first kept)
    assert pareto_options(cost, loss) == [5, 3, 1, 0]
    # a cheaper option with less loss removes everything above it
    assert pareto_options(np.array([2.0, 4.0, 8.0]), np.array([1.0, 2.0, 0.5])) == [0, 2]


def test_clustering_recovers_planted_groups():
    rng = np.random.default_rng(0)
    profiles = np.array([[1e-2, 1e-4, 1e-6], [1e-3, 1e-3, 1e-3], [1e-5, 1e-2, 1e-1]])
    truth = [0, 1, 2, 0, 2, 1, 0, 0, 2, 1]
    loss = profiles[truth] * rng.uniform(0.8, 1.25, (len(truth), 3))
    assert cluster_layers(loss, 3) == [[0, 3, 6, 7], [1, 5, 9], [2, 4, 8]]
    assert cluster_layers(loss, None) == [[i] for i in range(10)]
    assert cluster_layers(loss, 1) == [list(range(10))]


def test_space_sizes_after_pruning_and_clustering():
    specs = candidate_specs("KV8,K4V4,K2V2")
    cost = np.array([s.avg_bits for s in specs])
    loss = np.array([
        [1e-6, 1e-3, 1e-1],  # all three on the front
        [1e-6, 1e-3, 1e-1],
        [1e-6, 1e-6, 1e-1],  # KV8 dominated by K4V4 (same loss, more bits)
        [1e-6, 1e-6, 1e-1],
    ])
    space, report = build_space(specs, loss, cost, groups=2)
    assert report.full == 3**4 and report.pruned == 3 * 3 * 2 * 2 and report.clustered == 3 * 2
    assert [g.layers for g in space.groups] == [[0, 1], [2, 3]]
    assert [[space.labels[c] for c in g.options] for g in space.groups] == [["KV2", "KV4", "KV8"], ["KV2", "KV4"]]
    assert space.layer_choice([2, 1]) == [2, 2, 1, 1]
    assert report.to_dict()["pruned"] == {"exact": "36", "log10": round(math.log10(36), 3)}


def brute_force(loss, allowed, weight, cost, limit):
    best, best_choice = math.inf, None
    for choice in itertools.product(*allowed):
        if sum(w * cost[c] for w, c in zip(weight, choice)) <= limit + 1e-9:
            total = sum(loss[u, c] for u, c in enumerate(choice))
            if total < best:
                best, best_choice = total, list(choice)
    return best_choice


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    units, n = 5, 4
    cost = np.array([2.0, 3.0, 4.0, 8.0])
    loss = rng.uniform(0, 1, (units, n)) / cost**2
    allowed = [sorted(rng.choice(n, size=rng.integers(2, n + 1), replace=False).tolist()) for _ in range(units)]
    weight = rng.integers(1, 4, units).tolist()
    limit = sum(weight) * rng.uniform(3.0, 5.0)
    got = solve_knapsack(loss, allowed, weight, [(cost, limit)])
    expected = brute_force(loss, allowed, weight, cost, limit)
    assert (got is None) == (expected is None)
    if got is not None:
        assert sum(loss[u, c] for u, c in enumerate(got)) == pytest.approx(sum(loss[u, c] for u, c in enumerate(expected)))


def test_knapsack_infeasible_budget():
    assert solve_knapsack(np.ones((2, 2)), [[0, 1], [0, 1]], [1, 1], [(np.array([4.0, 8.0]), 7.0)]) is None


def test_pruning_keeps_what_is_cheaper_in_any_cost():
    """Same nominal bits, lower loss, more real bytes (outliers): it does not push out the option with fewer
    bytes, which a byte budget may still need; one worse in every cost and in loss goes."""
    nominal = np.array([3.0, 3.0, 4.0, 4.0])
    nbytes = np.array([100.0, 120.0, 130.0, 140.0])
    loss = np.array([0.2, 0.1, 0.05, 0.3])
    assert pareto_options(nominal, loss) == [1, 2]  # by nominal bits alone option 0 is dominated
    assert pareto_options(np.stack([nominal, nbytes]), loss) == [0, 1, 2]
