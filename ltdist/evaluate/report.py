"""Report files: ``report.json`` (the issue's schema), ``per_class_accuracy.json`` and ``report.md``.

Accuracies are fractions in [0, 1] in the JSON files and percentages in the Markdown tables, which
follow the layout of paper 1 Tables 1 and 2 (Method | Classifier type | Many | Medium | Few | Total).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ltdist.evaluate.groups import GROUPS

COLUMNS = (*GROUPS, "all")


@dataclass(frozen=True)
class TableSection:
    """Rows of one Markdown table that share a "Method" cell (e.g. "Full training")."""

    method: str
    classifiers: Sequence[str]


def _percent(value: float | None) -> str:
    return "N/A" if value is None else f"{100 * value:.1f}"


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


def write_report(out_dir: Path, *, dataset: str, groups: dict[str, list[int]],
                 results: dict[str, dict[str, float | None]], per_class: dict[str, list[float]],
                 train_counts: Sequence[int], tables: dict[str, Sequence[TableSection]],
                 notes: Sequence[str] = (), plots: Sequence[Path] = (),
                 labels: dict[str, str] | None = None) -> Path:
    """Write report.json, per_class_accuracy.json and report.md into ``out_dir``; return report.md's path.

    Args:
        groups: class ids per group ("many", "medium", "few").
        results: classifier name → {"many", "medium", "few", "all"} top-1 in [0, 1] (None: no class).
        per_class: classifier name → [C] per-class top-1 in [0, 1] (NaN: class not in the test split).
        train_counts: [C] training samples per class, the grouping variable.
        tables: title → sections; each becomes one Markdown table.
        notes: lines printed under the tables (setting, thresholds, what "N/A" means).
        plots: PNG files to link from the Markdown report.
        labels: classifier name → its text in the Markdown tables (default: the name).
    """
    missing = [name for section in (s for t in tables.values() for s in t) for name in section.classifiers
               if name not in results]
    if missing:
        raise KeyError(f"tables name classifiers without results: {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"dataset": dataset, "groups": {g: list(groups[g]) for g in GROUPS},
              "classifiers": {name: {c: acc[c] for c in COLUMNS} for name, acc in results.items()}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    nan_to_none = lambda v: None if v != v else v  # JSON has no NaN
    (out_dir / "per_class_accuracy.json").write_text(json.dumps(
        {"train_counts": [int(n) for n in train_counts],
         "classifiers": {name: [nan_to_none(v) for v in values] for name, values in per_class.items()}},
        indent=2) + "\n")

    md = [f"# Long-tail evaluation: {dataset}", ""]
    for title, sections in tables.items():
        md += [f"## {title}", "", format_table(results, sections, labels), ""]
    md += [f"- {note}" for note in notes] + [""] if notes else []
    md += ["## Per-class top-1 (%)", "",
           "| Class | Train count | Group | " + " | ".join(per_class) + " |",
           "|---:|---:|---|" + "---:|" * len(per_class)]
    group_of = {c: g for g in GROUPS for c in groups[g]}
    for c, n in enumerate(train_counts):
        cells = [_percent(nan_to_none(values[c])) for values in per_class.values()]
        md.append(f"| {c} | {int(n)} | {group_of.get(c, '')} | " + " | ".join(cells) + " |")
    md.append("")
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
