"""Figures of a profile: the sensitivity heatmap and K-only vs V-only loss per layer (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtuner.profile.sensitivity import Profile


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def heatmap(profile: Profile, path: str | Path) -> Path:
    """Layers x candidates, colour = log10 of the single-layer KL."""
    plt = _pyplot()
    values = np.log10(np.maximum(profile.loss, 1e-12))
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(profile.candidates), 1.5 + 0.22 * profile.num_layers))
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(profile.candidates)), profile.labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(profile.num_layers), [str(i) for i in range(profile.num_layers)], fontsize=7)
    ax.set_xlabel("candidate (only this layer quantized)")
    ax.set_ylabel("layer")
    ax.set_title(f"log10 KL per token ({profile.tokens} calibration tokens)")
    fig.colorbar(image, ax=ax, label="log10 KL")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kv_split_figure(profile: Profile, path: str | Path) -> Path:
    """Per layer: KL with only the keys quantized vs only the values (both at ``split_bits``)."""
    if profile.k_only is None or profile.v_only is None:
        raise ValueError("this profile has no K-only / V-only runs (profile with split_bits set)")
    plt = _pyplot()
    layers = np.arange(profile.num_layers)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(layers - 0.2, profile.k_only, width=0.4, label=f"K{profile.split_bits} only (V fp)")
    ax.bar(layers + 0.2, profile.v_only, width=0.4, label=f"V{profile.split_bits} only (K fp)")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL per token")
    ax.set_title("Key vs value sensitivity, one layer quantized at a time")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
