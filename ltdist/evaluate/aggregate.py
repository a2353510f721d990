"""Mean ± std over several runs' ``report.json`` (e.g. seeds) as a paper-1-style Markdown table.

    python -m ltdist.evaluate.aggregate runs/fmnist_lt/seed*/report.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from ltdist.evaluate.report import COLUMNS

SPLITS = ("test", "val")  # the splits report.json scores: "classifiers" (test) and "val"


def split_rows(report: dict, split: str, path: Path | str = "report.json") -> dict[str, dict]:
    """The classifier rows of one split of a parsed report.json: test's "classifiers", or "val"'s."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        return report["classifiers"]
    if "val" not in report:
        raise ValueError(f"{path} has no val scores (the run has no features/val.pt, or its report predates them: "
                         f"rerun its evaluate stage, stages=[evaluate])")
    return report["val"]["classifiers"]


def aggregate_reports(paths: Sequence[Path], split: str = "test"
                      ) -> dict[str, dict[str, tuple[float, float, int] | None]]:
    """classifier → column → (mean, sample std, runs) in [0, 1], over the runs that report it; None if none.

    ``split``: "test" (the report's tables) or "val". Every report must be of the same dataset with the same
    groups (else the means mix different things).
    """
    if not paths:
        raise ValueError("aggregate_reports: no report.json given")
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for path, r in zip(paths, reports):
        if (r["dataset"], r["groups"]) != (first["dataset"], first["groups"]):
            raise ValueError(f"{path}: dataset or class groups differ from {paths[0]}; cannot average them")
    rows = [split_rows(r, split, path) for path, r in zip(paths, reports)]
    names = list(dict.fromkeys(n for r in rows for n in r))
    table: dict[str, dict[str, tuple[float, float, int] | None]] = {}
    for name in names:
        table[name] = {}
        for column in COLUMNS:
            values = [r[name][column] for r in rows if name in r and r[name][column] is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table[name][column] = (statistics.fmean(values), std, len(values)) if values else None
    return table


def mean_std_cell(value: tuple[float, float, int] | None) -> str:
    """"mean ± std" in percent for a (mean, std, runs) of fractions; "mean (1 run)" when one run gives no
    spread; "N/A" for None."""
    if value is None:
        return "N/A"
    if value[2] == 1:
        return f"{100 * value[0]:.1f} (1 run)"
    return f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"


def format_mean_std_table(table: dict[str, dict[str, tuple[float, float, int] | None]],
                          names: Sequence[str] | None = None) -> str:
    """Markdown rows "mean ± std" in percent, columns Many / Medium / Few / Total (paper 1 Table 1)."""
    lines = ["| Classifier type | Many-shot | Medium-shot | Few-shot | Total |", "|---|---:|---:|---:|---:|"]
    for name in names or list(table):
        cells = [mean_std_cell(table[name][c]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltdist.evaluate.aggregate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files (one per run)")
    args = parser.parse_args(argv)
    table = aggregate_reports(args.reports)
    print(f"{len(args.reports)} runs; top-1 (%) mean ± sample std\n")
    print(format_mean_std_table(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
