"""The Pareto-front figure: size vs measured loss (log), with uniform configs for reference (PNG, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def front_figure(
    points: Sequence[Any], front: Sequence[Any], uniform: Sequence[Any], picks: Sequence[Any], size: str, path: str | Path
) -> Path:
    """``points`` / ``front`` / ``uniform``: measured configs (``avg_bits``, ``kv_bytes``, ``loss``, ``name``);
    ``picks``: per-budget choices (``budget``, ``best``)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    def x(p: Any) -> float:
        return p.avg_bits if size == "avg_bits" else p.kv_bytes / 2**20

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter([x(p) for p in points], [p.loss for p in points], s=12, color="0.7", label="measured configs")
    ax.plot([x(p) for p in front], [p.loss for p in front], "o-", color="C0", ms=4, label="Pareto front")
    ax.scatter([x(p) for p in uniform], [p.loss for p in uniform], marker="s", color="C3", label="uniform KIVI")
    for p in uniform:
        ax.annotate(p.name.removeprefix("uniform "), (x(p), p.loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    chosen = [pk for pk in picks if pk.best is not None]
    ax.scatter([x(pk.best) for pk in chosen], [pk.best.loss for pk in chosen], marker="*", s=140, color="C1",
               zorder=3, label="chosen per budget")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per KV element" if size == "avg_bits" else "KV cache MiB (calibration length)")
    ax.set_ylabel("KL per token vs full precision (calibration)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
