"""One comparison table across runs: method (stage-1 objective × stage-2 classifier) × many / medium / few / all.

    python -m ltdist.evaluate.compare RUN_DIR... [--out DIR]      (also: ltdist compare ...)

A RUN_DIR is a run directory (``report.json`` + ``config.yaml``) or any directory above runs (every
``report.json`` below it is taken). A run's stage-1 objective is its config's ``method.loss`` ("ce" when
the key is absent) with its ``model.classifier`` head; runs of the same experiment and objective are the
seeds of one method, and every classifier row of their reports (the head, kt, crt, tau_norm, ...) is
averaged over them with :func:`ltdist.evaluate.aggregate.aggregate_reports` (mean ± sample std).
Writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` (one panel per column, a bar per
method coloured by stage-1 objective, error bars = std); the run list says what each run's stage-2
stages chose on val (τ, the KT k set).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ltdist.evaluate.aggregate import aggregate_reports, mean_std_cell
from ltdist.evaluate.plots import plot_comparison
from ltdist.evaluate.report import COLUMNS
from ltdist.methods.classifier_set import load_classifier_sets

CHOSEN_KEYS = ("tau", "ks")  # what tau_norm, logit_adjust and kt_val choose on val
COLUMN_TITLES = {"many": "Many-shot", "medium": "Medium-shot", "few": "Few-shot", "all": "All"}


@dataclass(frozen=True)
class RunInfo:
    """One run: its report, stage-1 objective ("ce", "balanced_softmax", ...), head and seed."""

    run_dir: Path
    experiment: str
    objective: str
    head: str
    seed: int

    @property
    def report(self) -> Path:
        return self.run_dir / "report.json"

    def chosen_on_val(self) -> dict[str, dict]:
        """Stage-2 file → its parameters chosen on val (τ, k set), for the files that chose any."""
        sets = load_classifier_sets(self.run_dir)
        picked = {m: {k: v for k, v in r.chosen.items() if k in CHOSEN_KEYS} for m, r in sets.items()}
        return {m: p for m, p in picked.items() if p}


def stage1_objective(cfg) -> str:
    """The run's ``method.loss`` ("ce" when absent); MPCL without its meta-network is paper 2's "CE + L_PC"."""
    loss = str(OmegaConf.select(cfg, "method.loss", default="ce"))
    if loss == "mpcl" and not OmegaConf.select(cfg, "method.mpcl.meta_network", default=True):
        return "ce + L_PC"
    return loss


def find_runs(paths: Sequence[Path]) -> list[RunInfo]:
    """The runs at or below ``paths`` (each needs report.json and config.yaml), sorted by directory."""
    reports: list[Path] = []
    for path in map(Path, paths):
        found = [path / "report.json"] if (path / "report.json").is_file() else sorted(path.rglob("report.json"))
        if not found:
            raise FileNotFoundError(f"{path}: no report.json at or below it (run the evaluate stage first)")
        reports += found
    runs = []
    for report in sorted(set(p.resolve() for p in reports)):
        config = report.parent / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing: cannot tell which stage-1 objective the run used")
        cfg = OmegaConf.load(config)
        runs.append(RunInfo(run_dir=report.parent, experiment=str(OmegaConf.select(cfg, "experiment", default="")),
                            objective=stage1_objective(cfg),
                            head=str(OmegaConf.select(cfg, "model.classifier", default="cosine")),
                            seed=int(OmegaConf.select(cfg, "trainer.seed", default=0))))
    return runs


def group_runs(runs: Sequence[RunInfo]) -> dict[str, list[RunInfo]]:
    """Stage-1 label "<objective> (<head> head)" → its runs (the seeds); the experiment is prefixed when two
    experiments share an objective. Two runs of one label with the same seed are an error (not two seeds)."""
    keys = {(r.experiment, r.objective, r.head) for r in runs}
    ambiguous = {(o, h) for _, o, h in keys if sum((o, h) == (o2, h2) for _, o2, h2 in keys) > 1}
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        label = f"{run.objective} ({run.head} head)"
        if (run.objective, run.head) in ambiguous:
            label = f"{run.experiment}: {label}"
        groups.setdefault(label, []).append(run)
    for label, members in groups.items():
        seeds = [r.seed for r in members]
        duplicate = sorted({s for s in seeds if seeds.count(s) > 1})
        if duplicate:
            dirs = [str(r.run_dir) for r in members if r.seed in duplicate]
            raise ValueError(f"{label}: several runs with seed {duplicate} ({', '.join(dirs)}); pass one per seed")
    return groups


def compare_runs(runs: Sequence[RunInfo], classifiers: Sequence[str] | None = None) -> list[dict]:
    """One row per (stage-1 label, stage-2 classifier): {"stage1", "stage2", "seeds", <column>: (mean, std, n) | None}.

    ``classifiers``: only these report rows (default: every row, in report order). Fractions in [0, 1].
    """
    rows = []
    for label, members in group_runs(runs).items():
        table = aggregate_reports([r.report for r in members])
        for name, columns in table.items():
            if classifiers is None or name in classifiers:
                rows.append({"stage1": label, "stage2": name, "seeds": sorted(r.seed for r in members), **columns})
    return rows


def pick_rows(rows: Sequence[dict], picks: Sequence[str]) -> list[dict]:
    """The rows named by ``picks`` ("<stage-1 label>=<stage-2 classifier>"), in that order; an unknown pick
    is an error that lists what exists. For a short table of chosen (objective, classifier) pairs."""
    by_key = {(r["stage1"], r["stage2"]): r for r in rows}
    chosen = []
    for pick in picks:
        stage1, sep, stage2 = pick.partition("=")
        if not sep or (stage1, stage2) not in by_key:
            known = sorted({r["stage1"] for r in rows})
            raise ValueError(f"--pick {pick!r}: no such STAGE1=CLASSIFIER row; stage-1 labels: {known}")
        chosen.append(by_key[(stage1, stage2)])
    return chosen


def format_comparison(rows: Sequence[dict]) -> str:
    """Markdown: Stage-1 objective | Stage-2 classifier | Many | Medium | Few | All (mean ± std, %) | Seeds."""
    lines = ["| Stage-1 objective | Stage-2 classifier | " + " | ".join(COLUMN_TITLES[c] for c in COLUMNS)
             + " | Seeds |", "|---|---|" + "---:|" * len(COLUMNS) + "---|"]
    previous = None
    for row in rows:
        stage1 = row["stage1"] if row["stage1"] != previous else ""
        previous = row["stage1"]
        cells = " | ".join(mean_std_cell(row[c]) for c in COLUMNS)
        lines.append(f"| {stage1} | {row['stage2']} | {cells} | {len(row['seeds'])} |")
    return "\n".join(lines)


def write_comparison(rows: Sequence[dict], runs: Sequence[RunInfo], out_dir: Path) -> dict[str, Path]:
    """comparison.md / .json / .png in ``out_dir``; returns their paths by suffix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = {r.run_dir: r.chosen_on_val() for r in runs}
    paths = {suffix: out_dir / f"comparison.{suffix}" for suffix in ("md", "json", "png")}
    as_dict = lambda v: None if v is None else {"mean": v[0], "std": v[1], "runs": v[2]}
    paths["json"].write_text(json.dumps({
        "columns": list(COLUMNS),
        "runs": [{"run_dir": str(r.run_dir), "experiment": r.experiment, "objective": r.objective, "head": r.head,
                  "seed": r.seed, "chosen_on_val": chosen[r.run_dir]} for r in runs],
        "methods": [{"stage1": r["stage1"], "stage2": r["stage2"], "seeds": r["seeds"],
                     **{c: as_dict(r[c]) for c in COLUMNS}} for r in rows]}, indent=2) + "\n")
    seeds = sorted({len(r["seeds"]) for r in rows})
    plot_comparison(paths["png"], [r["stage1"] for r in rows], [r["stage2"] for r in rows],
                    {c: [None if r[c] is None else r[c][0] for r in rows] for c in COLUMNS},
                    {c: [None if r[c] is None else r[c][1] for r in rows] for c in COLUMNS},
                    title=f"mean ± std over {'/'.join(map(str, seeds))} seeds")
    md = ["# Long-tail comparison", "",
          f"{len(runs)} runs; top-1 (%) on the test split, mean ± sample std over the seeds of each stage-1 "
          "objective; many / medium / few: mean per-class accuracy of the group, All: every test sample.", "",
          format_comparison(rows), "", "## Runs", ""]
    for r in runs:
        picks = "; ".join(f"{m} " + ", ".join(f"{k} = {v}" for k, v in p.items()) for m, p in chosen[r.run_dir].items())
        md.append(f"- `{r.run_dir}`: {r.objective} ({r.head} head), seed {r.seed}"
                  + (f"; chosen on val: {picks}" if picks else ""))
    md += ["", f"![comparison]({paths['png'].name})", ""]
    paths["md"].write_text("\n".join(md))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ltdist compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories, or directories above them")
    parser.add_argument("--out", type=Path, help="where the comparison files go (default: <first RUN_DIR>/comparison)")
    parser.add_argument("--classifiers", help="comma-separated report rows to keep (default: all), e.g. cRT,LWS")
    parser.add_argument("--pick", nargs="+", metavar="STAGE1=CLASSIFIER",
                        help="only these (stage-1 label, report row) pairs, in this order, e.g. "
                             "'ce (linear head)=cRT'")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs)
        keep = args.classifiers.split(",") if args.classifiers else None
        rows = compare_runs(runs, keep)
        if args.pick:
            rows = pick_rows(rows, args.pick)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ltdist compare: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"ltdist compare: no report row named {args.classifiers}", file=sys.stderr)
        return 2
    paths = write_comparison(rows, runs, args.out or args.runs[0] / "comparison")
    print(format_comparison(rows))
    print("\n" + "\n".join(f"{suffix}: {path}" for suffix, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
