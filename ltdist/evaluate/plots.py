"""PNG plots of a long-tail evaluation (matplotlib, Agg backend: no display needed on cluster nodes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ltdist.evaluate.groups import GROUPS

_BAND_COLOURS = {"few": "#f4cccc", "medium": "#fff2cc", "many": "#d9ead3"}


def plot_per_class_accuracy(path: Path, train_counts: Sequence[int], per_class: dict[str, Sequence[float]],
                            many_threshold: int, few_threshold: int) -> Path:
    """Per-class top-1 (%) against training count (log axis) with the group bands (paper 1 Fig. 2 style).

    Bands: few-shot n < few_threshold, medium-shot up to many_threshold, many-shot above.
    """
    counts = np.asarray(train_counts, dtype=float)
    shown = np.maximum(counts, 1)  # a class never trained on sits at 1 on the log axis
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lo, hi = shown.min() / 1.5, shown.max() * 1.5
    bands = {"few": (lo, few_threshold), "medium": (few_threshold, many_threshold),
             "many": (many_threshold, hi)}
    for name in GROUPS:
        start, end = max(bands[name][0], lo), min(bands[name][1], hi)
        if start < end:
            ax.axvspan(start, end, color=_BAND_COLOURS[name], alpha=0.6, lw=0, label=f"{name}-shot")
    order = np.argsort(shown)
    for name, values in per_class.items():
        ax.plot(shown[order], 100 * np.asarray(values, dtype=float)[order], marker="o", ms=4, label=name)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 100)
    ax.set_xlabel("training samples of the class")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_group_bars(path: Path, results: dict[str, dict[str, float | None]],
                    errors: dict[str, dict[str, float | None]] | None = None, title: str | None = None) -> Path:
    """Grouped bars: top-1 (%) per group (many, medium, few, all) for every classifier.

    ``results`` and ``errors`` (error-bar half-lengths, e.g. the std over seeds) are fractions in [0, 1].
    """
    columns = (*GROUPS, "all")
    names = list(results)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(columns))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(names)), 5.5))
    colours = plt.get_cmap("tab20").colors  # more classifiers than tab10 has colours
    for i, name in enumerate(names):
        heights = [100 * (results[name][c] if results[name][c] is not None else np.nan) for c in columns]
        yerr = None if errors is None else [100 * (errors[name][c] or 0.0) for c in columns]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, yerr=yerr, capsize=2 if yerr else 0,
               label=name, color=colours[i % 20])
    ax.set_xticks(x, [f"{c}-shot" if c != "all" else "all" for c in columns])
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))  # below: bars stay visible
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
