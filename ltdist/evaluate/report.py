"""Report files: ``report.json`` (the issue's schema), ``per_class_accuracy.json`` / ``.csv`` and ``report.md``.

Accuracies are fractions in [0, 1] in the JSON and CSV files and percentages in the Markdown tables, which
follow the layout of paper 1 Tables 1 and 2 (Method | Classifier type | Many | Medium | Few | Total).
Past ``per_class_rows_max`` classes (iNaturalist-2018 has 8142) a row per class is unreadable: report.md
then shows classes binned by training count (:mod:`ltdist.count_bins`) and report.json gains their
figures under "count_bins"; the per-class files keep every class.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ltdist.class_groups import GROUPS
from ltdist.count_bins import CountBin, binned_accuracy, count_bins, format_range
from ltdist.evaluate.prototype_health import health_markdown

COLUMNS = (*GROUPS, "all")


@dataclass(frozen=True)
class TableSection:
    """Rows of one Markdown table that share a "Method" cell (e.g. "Full training")."""

    method: str
    classifiers: Sequence[str]


def _percent(value: float | None) -> str:
    return "N/A" if value is None else f"{100 * value:.1f}"


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)  # JSON has no NaN


def format_table(results: dict[str, dict[str, float | None]], sections: Sequence[TableSection],
                 labels: dict[str, str] | None = None) -> str:
    """A Markdown table in the layout of paper 1 Table 1: one row per classifier, percentages.

    ``labels`` maps a classifier name to the text of its "Classifier type" cell (default: the name).
    """
    labels = labels or {}
    lines = ["| Method | Classifier type | Many-shot | Medium-shot | Few-shot | Total |",
             "|---|---|---:|---:|---:|---:|"]
    for section in sections:
        for row, name in enumerate(section.classifiers):
            cells = [_percent(results[name][c]) for c in COLUMNS]
            lines.append(f"| {section.method if row == 0 else ''} | {labels.get(name, name)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_per_class_csv(path: Path, train_counts: Sequence[int], group_of: dict[int, str],
                         per_class: dict[str, list[float]]) -> None:
    """One row per class: class, train_count, group, then each classifier's top-1 in [0, 1] (empty: untested)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["class", "train_count", "group", *per_class])
        cell = lambda v: "" if math.isnan(v) else repr(float(v))  # repr: the shortest text that reads back exact
        for c, n in enumerate(train_counts):
            writer.writerow([c, int(n), group_of.get(c, ""), *(cell(values[c]) for values in per_class.values())])


def _bin_summary(bins: Sequence[CountBin], per_class: dict[str, list[float]]) -> list[dict]:
    """report.json's "count_bins": per bin its count range, class count and each classifier's mean / std."""
    stats = {name: binned_accuracy(values, bins) for name, values in per_class.items()}
    return [{"lo": b.lo, "hi": b.hi, "classes": len(b.classes),
             "mean": {name: _finite_or_none(mean[i]) for name, (mean, _) in stats.items()},
             "std": {name: _finite_or_none(std[i]) for name, (_, std) in stats.items()}}
            for i, b in enumerate(bins)]


def _binned_section(summary: list[dict], names: Sequence[str], num_classes: int, rows_max: int) -> list[str]:
    """report.md's table of :func:`_bin_summary`: a row per bin, "mean ± std" (%) per classifier."""

    def cell(b: dict, name: str) -> str:
        return "N/A" if b["mean"][name] is None else f"{_percent(b['mean'][name])} ± {_percent(b['std'][name])}"

    lines = ["## Per-class top-1 (%) by training count", "",
             f"{num_classes} classes, more than evaluate.per_class_rows_max = {rows_max}: classes are binned by "
             f"training count n at powers of 2 (0, 1, 2–3, 4–7, …; an empty bin joins the next one). A cell is "
             f"the mean ± std of the per-class top-1 over the bin's classes with a test sample (classes without "
             f"one are left out). Every class's figures: `per_class_accuracy.json` and `per_class_accuracy.csv`.",
             "",
             "| Train count | Classes | " + " | ".join(names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for b in summary:
        cells = " | ".join(cell(b, name) for name in names)
        lines.append(f"| {format_range(b['lo'], b['hi'])} | {b['classes']} | {cells} |")
    return [*lines, ""]


def write_report(out_dir: Path, *, dataset: str, groups: dict[str, list[int]],
                 results: dict[str, dict[str, float | None]], per_class: dict[str, list[float]],
                 train_counts: Sequence[int], tables: dict[str, Sequence[TableSection]],
                 notes: Sequence[str] = (), plots: Sequence[Path] = (),
                 labels: dict[str, str] | None = None, per_class_rows_max: int | None = None,
                 prototype_health: dict | None = None, extra: dict | None = None) -> Path:
    """Write report.json, per_class_accuracy.json / .csv and report.md into ``out_dir``; return report.md's path.

    Args:
        groups: class ids per group ("many", "medium", "few").
        results: classifier name → {"many", "medium", "few", "all"} top-1 in [0, 1] (None: no class).
        per_class: classifier name → [C] per-class top-1 in [0, 1] (NaN: class not in the test split).
        train_counts: [C] training samples per class, the grouping variable.
        tables: title → sections; each becomes one Markdown table.
        notes: lines printed under the tables (setting, thresholds, what "N/A" means).
        plots: PNG files to link from the Markdown report.
        labels: classifier name → its text in the Markdown tables (default: the name).
        per_class_rows_max: with more classes than this, report.md bins the classes by training count
            instead of a row per class, and report.json gains "count_bins"; None: a row per class at any C.
        prototype_health: an MPCL run's :func:`ltdist.evaluate.prototype_health.prototype_health`, or None:
            report.json's "prototype_health" and a report.md section.
        extra: more top-level entries of report.json (e.g. "weights": what the backbone started from).
    """
    missing = [name for section in (s for t in tables.values() for s in t) for name in section.classifiers
               if name not in results]
    if missing:
        raise KeyError(f"tables name classifiers without results: {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    binned = per_class_rows_max is not None and len(train_counts) > per_class_rows_max
    report = {"dataset": dataset, "groups": {g: list(groups[g]) for g in GROUPS},
              "classifiers": {name: {c: acc[c] for c in COLUMNS} for name, acc in results.items()}, **(extra or {})}
    if binned:
        report["count_bins"] = _bin_summary(count_bins(train_counts), per_class)
    if prototype_health is not None:
        report["prototype_health"] = prototype_health
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "per_class_accuracy.json").write_text(json.dumps(
        {"train_counts": [int(n) for n in train_counts],
         "classifiers": {name: [_finite_or_none(v) for v in values] for name, values in per_class.items()}},
        indent=2) + "\n")
    group_of = {c: g for g in GROUPS for c in groups[g]}
    _write_per_class_csv(out_dir / "per_class_accuracy.csv", train_counts, group_of, per_class)

    md = [f"# Long-tail evaluation: {dataset}", ""]
    for title, sections in tables.items():
        md += [f"## {title}", "", format_table(results, sections, labels), ""]
    md += [f"- {note}" for note in notes] + [""] if notes else []
    if binned:
        md += _binned_section(report["count_bins"], list(per_class), len(train_counts), per_class_rows_max)
    else:
        md += ["## Per-class top-1 (%)", "",
               "| Class | Train count | Group | " + " | ".join(per_class) + " |",
               "|---:|---:|---|" + "---:|" * len(per_class)]
        for c, n in enumerate(train_counts):
            cells = [_percent(_finite_or_none(values[c])) for values in per_class.values()]
            md.append(f"| {c} | {int(n)} | {group_of.get(c, '')} | " + " | ".join(cells) + " |")
        md.append("")
    if prototype_health is not None:
        md += health_markdown(prototype_health)
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
