"""PNG plots of a long-tail evaluation (matplotlib, Agg backend: no display needed on cluster nodes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ltdist.class_groups import GROUPS
from ltdist.count_bins import binned_accuracy, count_bins

_BAND_COLOURS = {"few": "#f4cccc", "medium": "#fff2cc", "many": "#d9ead3"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


def _count_axes(ax: plt.Axes, lo: float, hi: float, many_threshold: int, few_threshold: int) -> None:
    """Log training-count x axis from lo to hi, top-1 (%) y axis, and the group bands; call before drawing
    the data, so the legend lists the bands first.

    Bands: few-shot n < few_threshold, medium-shot up to many_threshold, many-shot above.
    """
    bands = {"few": (lo, few_threshold), "medium": (few_threshold, many_threshold),
             "many": (many_threshold, hi)}
    for name in GROUPS:
        start, end = max(bands[name][0], lo), min(bands[name][1], hi)
        if start < end:
            ax.axvspan(start, end, color=_BAND_COLOURS[name], alpha=0.6, lw=0, label=f"{name}-shot")
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 100)
    ax.set_xlabel("training samples of the class")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)


def plot_per_class_accuracy(path: Path, train_counts: Sequence[int], per_class: dict[str, Sequence[float]],
                            many_threshold: int, few_threshold: int) -> Path:
    """Per-class top-1 (%) against training count (log axis) with the group bands (paper 1 Fig. 2 style).

    One point per class: readable up to a few dozen classes (:func:`plot_binned_accuracy` beyond).
    """
    counts = np.asarray(train_counts, dtype=float)
    shown = np.maximum(counts, 1)  # a class never trained on sits at 1 on the log axis
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _count_axes(ax, shown.min() / 1.5, shown.max() * 1.5, many_threshold, few_threshold)
    order = np.argsort(shown)
    for name, values in per_class.items():
        ax.plot(shown[order], 100 * np.asarray(values, dtype=float)[order], marker="o", ms=4, label=name)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_binned_accuracy(path: Path, train_counts: Sequence[int], per_class: dict[str, Sequence[float]],
                         many_threshold: int, few_threshold: int) -> Path:
    """Mean per-class top-1 (%) of each training-count bin with a ± 1 std band, against count (log axis).

    Bins as :func:`ltdist.count_bins.count_bins`, each drawn at the geometric centre of its count range;
    untested classes are left out of the mean. Group bands as :func:`plot_per_class_accuracy`. The bands of
    more than about 4 classifiers cover each other: the caller picks them.
    """
    bins = count_bins(train_counts)
    floor = lambda n: max(n, 0.5)  # n = 0 has no place on a log axis: it is drawn at 0.5
    centres = np.array([np.sqrt(floor(b.lo) * floor(b.hi)) for b in bins])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _count_axes(ax, floor(bins[0].lo) / 1.5, floor(bins[-1].hi) * 1.5, many_threshold, few_threshold)
    for i, (name, values) in enumerate(per_class.items()):
        mean, std = binned_accuracy(values, bins)
        ax.plot(centres, 100 * mean, marker="o", ms=4, label=name, color=f"C{i % 10}")
        ax.fill_between(centres, 100 * np.clip(mean - std, 0, 1), 100 * np.clip(mean + std, 0, 1),
                        color=f"C{i % 10}", alpha=0.12, lw=0)
    ax.set_title(f"{len(train_counts)} classes in {len(bins)} training-count bins: mean ± std over a bin's "
                 f"classes", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_histogram(path: Path, groups: dict[str, list[int]], per_class: dict[str, Sequence[float]]) -> Path:
    """Histogram of per-class top-1 (%) in 5-point bins, one panel per group, a step line per classifier.

    ``per_class``: classifier name → [C] per-class top-1 in [0, 1]; untested classes (NaN) are left out.
    More than about 4 overlaid classifiers are hard to tell apart: the caller picks them.
    """
    edges = np.linspace(0, 100, 21)
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(13, 4))
    for ax, group in zip(axes, GROUPS):
        for i, (name, values) in enumerate(per_class.items()):
            accuracy = 100 * np.asarray(values, dtype=float)[groups[group]]
            ax.hist(accuracy[~np.isnan(accuracy)], bins=edges, histtype="step", lw=1.5, label=name,
                    color=f"C{i % 10}")
        ax.set_title(f"{group}-shot ({len(groups[group])} classes)", fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_xlabel("per-class test top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("classes")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=max(len(names), 1), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the legend above the panels
    return _save(fig, path)


def plot_group_bars(path: Path, results: dict[str, dict[str, float | None]]) -> Path:
    """Grouped bars: top-1 (%) per group (many, medium, few, all) for every classifier."""
    columns = (*GROUPS, "all")
    names = list(results)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(columns))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(names)), 5.5))
    colours = plt.get_cmap("tab20").colors  # more classifiers than tab10 has colours
    for i, name in enumerate(names):
        heights = [100 * (results[name][c] if results[name][c] is not None else np.nan) for c in columns]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, label=name, color=colours[i % 20])
    ax.set_xticks(x, [f"{c}-shot" if c != "all" else "all" for c in columns])
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))  # below: bars stay visible
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(path: Path, stage1: Sequence[str], stage2: Sequence[str],
                    means: dict[str, Sequence[float | None]], stds: dict[str, Sequence[float | None]],
                    title: str = "") -> Path:
    """One panel per column (many, medium, few, all): a bar per method with its error bar, coloured by stage 1.

    Method i is (``stage1[i]``, ``stage2[i]``); ``means[column][i]`` and ``stds[column][i]`` are fractions in
    [0, 1] (None: no class in the group). Horizontal bars keep dozens of methods readable.
    """
    columns = (*GROUPS, "all")
    n = len(stage2)
    objectives = list(dict.fromkeys(stage1))
    palette = plt.get_cmap("tab10").colors
    colours = [palette[objectives.index(s) % 10] for s in stage1]
    fig, axes = plt.subplots(1, len(columns), sharey=True, figsize=(14, 1.6 + 0.24 * n))
    y = np.arange(n)
    as_percent = lambda values: [np.nan if v is None else 100 * v for v in values]
    for ax, column in zip(axes, columns):
        ax.barh(y, as_percent(means[column]), xerr=np.nan_to_num(as_percent(stds[column])), color=colours,
                capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xlim(0, 100)
        ax.set_title(f"{column}-shot" if column != "all" else "all")
        ax.grid(axis="x", alpha=0.3)
        for boundary in [i - 0.5 for i in range(1, n) if stage1[i] != stage1[i - 1]]:
            ax.axhline(boundary, color="grey", lw=0.6)
    axes[0].set_yticks(y, stage2, fontsize=7)
    axes[0].invert_yaxis()  # the first method on top, as in the Markdown table
    fig.supxlabel("test top-1 (%)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i % 10]) for i in range(len(objectives))]
    fig.legend(handles, objectives, loc="upper center", ncol=min(len(objectives), 4), fontsize=8,
               title=title or None, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the legend above the panels
    return _save(fig, path)
