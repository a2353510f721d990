"""One comparison table across runs: method (stage-1 objective × stage-2 classifier) × many / medium / few / all.

    python -m ltdist.evaluate.compare RUN_DIR... [--out DIR]      (also: ltdist compare ...)

A RUN_DIR is a run directory (``report.json`` + ``config.yaml``) or any directory above runs (every
``report.json`` below it is taken). A run's stage-1 objective is its config's ``method.loss`` ("ce" when
the key is absent) with its ``model.classifier`` head; runs of the same experiment and objective are the
seeds of one method, and every classifier row of their reports (the head, kt, crt, tau_norm, ...) is
averaged over them with :func:`ltdist.evaluate.aggregate.aggregate_reports` (mean ± sample std).
Writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` (one panel per column, a bar per
method coloured by stage-1 objective, error bars = std); the run list says what each run's stage-2
stages chose on val (τ, the KT k set). ``--split val`` compares the rows scored on val instead of test
(report.json's ``"val"``): what a choice such as the training budget may read. ``--keep-reports`` copies
each run's report.json and config.yaml into ``<out>/runs/``: ``ltdist compare <out>/runs`` then gives the
same comparison without the run directories (the evidence a README table is checked against).

The conclusions are computed, not typed: a backbone × classifier matrix (All and Few), the best classifier
per backbone and overall (by mean All) with every classifier it does not beat beyond seed noise, and each
``--claim "STAGE1=ROW > STAGE1=ROW"`` checked in All and Few. Every difference is paired over seeds with
a 95 % Student-t interval (:mod:`ltdist.evaluate.paired`); an interval that contains 0 is written "tie".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from omegaconf import OmegaConf

from ltdist.evaluate.aggregate import SPLITS, aggregate_reports, mean_std_cell, split_rows
from ltdist.evaluate.paired import PairedDifference, paired_difference
from ltdist.evaluate.plots import plot_comparison
from ltdist.evaluate.report import COLUMNS
from ltdist.methods.classifier_set import load_classifier_sets

CHOSEN_KEYS = ("tau", "ks")  # what tau_norm, logit_adjust and kt_val choose on val
COLUMN_TITLES = {"many": "Many-shot", "medium": "Medium-shot", "few": "Few-shot", "all": "All"}
CLAIM_COLUMNS = ("all", "few")  # the columns the matrix shows and every claim is checked in


@dataclass(frozen=True)
class RunInfo:
    """One run: its report, stage-1 objective ("ce", "balanced_softmax", ...), head and seed."""

    run_dir: Path
    experiment: str
    objective: str
    head: str
    seed: int
    split: str = "test"  # which of report.json's splits its rows come from (aggregate.SPLITS)

    @property
    def report(self) -> Path:
        return self.run_dir / "report.json"

    @cached_property
    def parsed_report(self) -> dict:
        """report.json, read once: the rows, the choices on val and the kept copy all come from it."""
        return json.loads(self.report.read_text())

    @cached_property
    def classifiers(self) -> dict[str, dict]:
        """report.json's classifier rows of :attr:`split`: every paired difference reads them."""
        return split_rows(self.parsed_report, self.split, self.report)

    def chosen_on_val(self) -> dict[str, dict]:
        """Stage-2 file → its parameters chosen on val (τ, k set), for the files that chose any: from
        report.json, or from ``classifiers/`` for a report written before it recorded them."""
        report = self.parsed_report
        if "chosen_on_val" in report:
            chosen = report["chosen_on_val"]
        else:
            chosen = {m: r.chosen for m, r in load_classifier_sets(self.run_dir).items()}
        picked = {m: {k: v for k, v in c.items() if k in CHOSEN_KEYS} for m, c in chosen.items()}
        return {m: p for m, p in picked.items() if p}


def stage1_objective(cfg) -> str:
    """The run's ``method.loss`` ("ce" when absent); MPCL without its meta-network is paper 2's "CE + L_PC"."""
    loss = str(OmegaConf.select(cfg, "method.loss", default="ce"))
    if loss == "mpcl" and not OmegaConf.select(cfg, "method.mpcl.meta_network", default=True):
        return "ce + L_PC"
    return loss


def find_runs(paths: Sequence[Path], split: str = "test") -> list[RunInfo]:
    """The runs at or below ``paths`` (each needs report.json and config.yaml), sorted by directory; their
    rows are those of ``split`` ("test" or "val")."""
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
                            seed=int(OmegaConf.select(cfg, "trainer.seed", default=0)), split=split))
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
        table = aggregate_reports([r.report for r in members], members[0].split)
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


def per_seed(runs: Sequence[RunInfo], classifier: str, column: str) -> dict[int, float]:
    """seed → the report value of ``classifier`` in ``column`` (fraction), for the runs that report it."""
    values = {}
    for run in runs:
        row = run.classifiers.get(classifier)
        if row is not None and row.get(column) is not None:
            values[run.seed] = float(row[column])
    return values


def method_name(stage1: str, stage2: str) -> str:
    return f"{stage1}={stage2}"


def check_claim(groups: dict[str, list[RunInfo]], claim: str, column: str) -> PairedDifference:
    """``claim`` "STAGE1=ROW > STAGE1=ROW" in ``column``, paired over seeds; an unknown side lists what exists."""
    left, sep, right = (part.strip() for part in claim.partition(">"))
    if not sep:
        raise ValueError(f"--claim {claim!r}: write it as 'STAGE1=ROW > STAGE1=ROW'")
    sides = []
    for side in (left, right):
        stage1, eq, row = side.rpartition("=")
        values = per_seed(groups.get(stage1, []), row, column) if eq else {}
        if not values:
            raise ValueError(f"--claim {claim!r}: no runs report {side!r}; stage-1 labels: {sorted(groups)}")
        sides.append(values)
    return paired_difference(sides[0], sides[1], a_name=left, b_name=right, column=column)


def best_of(groups: dict[str, list[RunInfo]], rows: Sequence[dict], column: str = "all") -> dict:
    """The best method by mean ``column`` among ``rows``, and its paired difference to every other row."""
    ranked = sorted((r for r in rows if r[column] is not None), key=lambda r: -r[column][0])
    if not ranked:
        raise ValueError(f"no row reports {column!r}")
    top = ranked[0]
    top_values = per_seed(groups[top["stage1"]], top["stage2"], column)
    versus, unpaired = [], []
    for r in ranked[1:]:
        values = per_seed(groups[r["stage1"]], r["stage2"], column)
        if not set(values) & set(top_values):  # e.g. a KT-val row named after the k set one seed chose
            unpaired.append(method_name(r["stage1"], r["stage2"]))
            continue
        versus.append(paired_difference(top_values, values, a_name=method_name(top["stage1"], top["stage2"]),
                                        b_name=method_name(r["stage1"], r["stage2"]), column=column))
    return {"best": method_name(top["stage1"], top["stage2"]), "column": column, "mean": top[column][0],
            "versus": versus, "unpaired": unpaired}


def conclusions(runs: Sequence[RunInfo], rows: Sequence[dict], claims: Sequence[str] = ()) -> dict:
    """The best classifier per backbone and overall (All) and every claim (All and Few), paired over seeds."""
    groups = group_runs(runs)
    labels = dict.fromkeys(r["stage1"] for r in rows if r["all"] is not None)
    per_backbone = {label: best_of(groups, [r for r in rows if r["stage1"] == label]) for label in labels}
    return {"best_per_backbone": per_backbone, "best_overall": best_of(groups, rows),
            "claims": [check_claim(groups, claim, column) for claim in claims for column in CLAIM_COLUMNS]}


def _best_sentence(best: dict) -> str:
    ties = [d.b for d in best["versus"] if d.verdict in ("tie", "<")]
    single = [d.b for d in best["versus"] if d.verdict == "n/a"]
    beaten = sum(d.verdict == ">" for d in best["versus"])
    tied = f"; tied with {', '.join(ties)}" if ties else ""
    unjudged = single + list(best.get("unpaired", ()))
    untested = (f"; no verdict against {len(unjudged)} rows with fewer than 2 seeds in common"
                if unjudged else "")
    return (f"{best['best']} ({100 * best['mean']:.1f} %), ahead of {beaten} of {len(best['versus'])} others "
            f"beyond seed noise{tied}{untested}")


def format_conclusions(found: dict) -> str:
    """Markdown bullets of :func:`conclusions`: best per backbone, best overall, then each claim's verdict."""
    lines = [f"- best on {label} (All): {_best_sentence(best)}" for label, best in found["best_per_backbone"].items()]
    lines.append(f"- best overall (All): {_best_sentence(found['best_overall'])}")
    lines += [f"- {d.sentence()}" for d in found["claims"]]
    return "\n".join(lines)


def format_matrix(rows: Sequence[dict], column: str) -> str:
    """Markdown: a row per stage-2 classifier, a column per stage-1 backbone, "mean ± std" of ``column``."""
    backbones = list(dict.fromkeys(r["stage1"] for r in rows))
    classifiers = list(dict.fromkeys(r["stage2"] for r in rows))
    cell = {(r["stage1"], r["stage2"]): r[column] for r in rows}
    lines = [f"| {COLUMN_TITLES[column]} | " + " | ".join(backbones) + " |", "|---|" + "---:|" * len(backbones)]
    lines += [f"| {c} | " + " | ".join("—" if (b, c) not in cell else mean_std_cell(cell[(b, c)]) for b in backbones)
              + " |" for c in classifiers]
    return "\n".join(lines)


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


def keep_reports(runs: Sequence[RunInfo], out_dir: Path) -> Path:
    """Copy each run's report.json and config.yaml to ``out_dir/runs/<experiment>/seed<seed>/``: what
    ``ltdist compare`` needs to compute the same comparison again elsewhere (``ltdist compare out_dir/runs``)."""
    root = out_dir / "runs"
    for run in runs:
        target = root / (run.experiment or run.run_dir.parent.name) / f"seed{run.seed}"
        target.mkdir(parents=True, exist_ok=True)
        report = dict(run.parsed_report)
        if "chosen_on_val" not in report:  # the classifier files stay behind
            report["chosen_on_val"] = run.chosen_on_val()
        (target / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        shutil.copyfile(run.run_dir / "config.yaml", target / "config.yaml")
    return root


def summary_markdown(rows: Sequence[dict], found: dict) -> str:
    """The backbone × classifier matrices (All, Few) and the conclusions: the part of comparison.md a README
    quotes (``tests/test_readme_results.py`` checks the README's copy against the kept reports)."""
    return "\n".join(["## Backbone × classifier", "",
                      *(line for c in CLAIM_COLUMNS for line in (format_matrix(rows, c), "")),
                      "## Conclusions", "", "Differences are paired over seeds with a 95 % Student-t interval; an "
                      "interval that contains 0 is a tie.", "", format_conclusions(found)])


def write_comparison(rows: Sequence[dict], runs: Sequence[RunInfo], out_dir: Path,
                     claims: Sequence[str] = ()) -> dict[str, Path]:
    """comparison.md / .json / .png in ``out_dir`` with the :func:`conclusions`; returns their paths by suffix."""
    found = conclusions(runs, rows, claims)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = {r.run_dir: r.chosen_on_val() for r in runs}
    paths = {suffix: out_dir / f"comparison.{suffix}" for suffix in ("md", "json", "png")}
    as_dict = lambda v: None if v is None else {"mean": v[0], "std": v[1], "runs": v[2]}
    split = runs[0].split if runs else "test"
    paths["json"].write_text(json.dumps({
        "split": split, "columns": list(COLUMNS),
        "runs": [{"run_dir": str(r.run_dir), "experiment": r.experiment, "objective": r.objective, "head": r.head,
                  "seed": r.seed, "chosen_on_val": chosen[r.run_dir]} for r in runs],
        "methods": [{"stage1": r["stage1"], "stage2": r["stage2"], "seeds": r["seeds"],
                     **{c: as_dict(r[c]) for c in COLUMNS}} for r in rows],
        "conclusions": {
            "best_per_backbone": {label: {**best, "versus": [d.as_dict() for d in best["versus"]]}
                                  for label, best in found["best_per_backbone"].items()},
            "best_overall": {**found["best_overall"], "versus": [d.as_dict() for d in found["best_overall"]["versus"]]},
            "claims": [d.as_dict() for d in found["claims"]], "text": format_conclusions(found)}},
        indent=2) + "\n")
    seeds = sorted({len(r["seeds"]) for r in rows})
    plot_comparison(paths["png"], [r["stage1"] for r in rows], [r["stage2"] for r in rows],
                    {c: [None if r[c] is None else r[c][0] for r in rows] for c in COLUMNS},
                    {c: [None if r[c] is None else r[c][1] for r in rows] for c in COLUMNS},
                    title=f"mean ± std over {'/'.join(map(str, seeds))} seeds")
    md = ["# Long-tail comparison", "",
          f"{len(runs)} runs; top-1 (%) on the {split} split, mean ± sample std over the seeds of each stage-1 "
          f"objective; many / medium / few: mean per-class accuracy of the group, All: every {split} sample.", "",
          format_comparison(rows), "", summary_markdown(rows, found), "", "## Runs", ""]
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
    parser.add_argument("--claim", action="append", default=[], metavar="'STAGE1=ROW > STAGE1=ROW'",
                        help="a claim to check (All and Few), paired over seeds; repeatable")
    parser.add_argument("--keep-reports", action="store_true",
                        help="copy every run's report.json and config.yaml into <out>/runs/, so that "
                             "'ltdist compare <out>/runs' recomputes this comparison without the run dirs")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="the report rows to compare: test (default) or val (for choices such as the budget)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs, args.split)
        keep = args.classifiers.split(",") if args.classifiers else None
        rows = compare_runs(runs, keep)
        if args.pick:
            rows = pick_rows(rows, args.pick)
        if not rows:
            raise ValueError(f"no report row named {args.classifiers}")
        out = args.out or args.runs[0] / "comparison"
        paths = write_comparison(rows, runs, out, args.claim)
        if args.keep_reports:
            paths["runs"] = keep_reports(runs, out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ltdist compare: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(rows))
    print("\n" + "\n".join(f"{suffix}: {path}" for suffix, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
