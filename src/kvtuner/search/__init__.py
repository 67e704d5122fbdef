"""Mixed-precision KV config search: Pareto pruning, layer clustering, an exact additive solve, Optuna on top."""

from kvtuner.search.additive import predicted_loss, solve_knapsack
from kvtuner.search.pipeline import BudgetPick, Point, SearchResult, SearchSettings, run_search
from kvtuner.search.space import SearchSpace, build_space, cluster_layers, pareto_options
from kvtuner.search.study import SearchError

__all__ = [
    "BudgetPick",
    "Point",
    "SearchError",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "build_space",
    "cluster_layers",
    "pareto_options",
    "predicted_loss",
    "run_search",
    "solve_knapsack",
]
