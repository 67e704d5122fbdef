"""The Pareto-front figure: size vs measured loss (log), with uniform configs for reference (PNG, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def front_figure(
    points: Sequence[Any], front: Sequence[Any], uniform: Sequence[Any], picks: Sequence[Any], size: str, path: str | Path,
    length: str = "calibration length",
) -> Path:
    """``points`` / ``front`` / ``uniform``: measured configs (``avg_bits``, ``kv_bytes``, ``loss``, ``name``);
    ``picks``: per-budget choices (``budget``, ``best``); ``length``: the context the bytes are counted at."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    def x(p: Any) -> float:
        return p.avg_bits if size == "avg_bits" else p.kv_bytes / 2**20

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter([x(p) for p in points], [p.loss for p in points], s=12, color="0.7", label="measured configs")
    ax.plot([x(p) for p in front], [p.loss for p in front], "o-", color="C0", ms=4, label="Pareto front")
    ax.scatter([x(p) for p in uniform], [p.loss for p in uniform], marker="s", color="C3", label="uniform configs")
    for p in uniform:
        ax.annotate(p.name.removeprefix("uniform "), (x(p), p.loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    chosen = [pk for pk in picks if pk.best is not None]
    ax.scatter([x(pk.best) for pk in chosen], [pk.best.loss for pk in chosen], marker="*", s=140, color="C1",
               zorder=3, label="chosen per budget")
    xlabel = "average bits per KV element" if size == "avg_bits" else f"KV cache MiB ({length})"
    return _save(fig, ax, xlabel, "KL per token vs full precision (calibration)", path)


def fronts_figure(runs: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Effective bits (real bytes) vs held-out KL of several searches' fronts in one plot.

    runs: label -> a ``search.json`` dict (its ``front`` and ``uniform`` points carry
    ``effective_bits`` and ``heldout``). Uniform configs are drawn once, from the first run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fronts = {label: sorted((p for p in run["front"] if p.get("heldout") is not None and p.get("effective_bits")),
                            key=lambda p: p["effective_bits"]) for label, run in runs.items()}
    if not any(fronts.values()):
        raise ValueError("no front point has a held-out KL and effective bits (were these searches validated?)")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, front) in enumerate(fronts.items()):
        ax.plot([p["effective_bits"] for p in front], [p["heldout"] for p in front], "o-", ms=4, color=f"C{i}",
                label=f"{label}: front")
    first = next(iter(runs.values()))
    uniform = [p for p in first["uniform"] if p.get("heldout") is not None and p.get("effective_bits")]
    ax.scatter([p["effective_bits"] for p in uniform], [p["heldout"] for p in uniform], marker="s", color="C3",
               label="uniform configs")
    for p in uniform:
        ax.annotate(p["name"].removeprefix("uniform "), (p["effective_bits"], p["heldout"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    return _save(fig, ax, "effective bits per KV element (real bytes: codes, scales, outliers, sink, tables)",
                 "held-out KL per token vs full precision", path)


def _save(fig: Any, ax: Any, xlabel: str, ylabel: str, path: str | Path) -> Path:
    """Log-scale loss axis, labels, grid and legend; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
