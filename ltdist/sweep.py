"""Run the comparison: presets × seeds, each train → extract → stage-2 stages → evaluate, then ``compare``.

    python -m ltdist.sweep --seeds 3 [--presets P ...] [--cluster local|slurm] [--out DIR] [key=value ...]
    (also: ltdist sweep ...)

A preset is a YAML file, optionally followed by ``+key=value`` overrides of its own, e.g.
``configs/experiment/fmnist_lt.yaml+model.classifier=linear``; by default every
``configs/experiment/fmnist_lt_*.yaml`` that sets ``method.loss``. Run ``<preset name>`` seed s lives in
``<out>/<name>/<name>/seed<s>`` (``experiment`` = the preset's name, so ``compare`` tells presets apart).
The ``key=value`` overrides apply to every run. A run's stages are (doctor,) train, extract, the preset's own
stage-2 stages, those of ``--stages``, then evaluate. A run whose directory already has ``report.json`` is
skipped, so re-running the same command resumes. Local runs go one after another on this machine (each
is CPU- or GPU-bound); on Slurm all pending runs are one submitit job array. When every run is done,
``<out>/comparison/`` gets the comparison (:mod:`ltdist.evaluate.compare`).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ltdist.config import ConfigError, load_config, validate_config
from ltdist.config.load import _load_preset
from ltdist.evaluate.compare import compare_runs, find_runs, format_comparison, write_comparison
from ltdist.launch import _write_config, build_executor, follow_job, resolve_run_dir

DEFAULT_PRESETS = "configs/experiment/fmnist_lt_*.yaml"
PIPELINE = ("train", "extract", "evaluate")  # every run's stages around the stage-2 ones
DEFAULT_STAGE2 = ("kt", "crt", "tau_norm", "lws", "ncm", "logit_adjust", "mpfa")  # every stage-2 classifier


@dataclass
class PlannedRun:
    """One (preset, seed): its resolved config and run directory."""

    preset: str
    seed: int
    cfg: DictConfig
    run_dir: Path

    @property
    def done(self) -> bool:
        return (self.run_dir / "report.json").is_file()


def default_presets(pattern: str = DEFAULT_PRESETS) -> list[str]:
    """Every preset matching ``pattern`` that sets ``method.loss`` (itself or through its ``defaults``)."""
    found = []
    for path in sorted(Path().glob(pattern)):
        if any(OmegaConf.select(layer, "method.loss") is not None for layer, _ in _load_preset(path)):
            found.append(str(path))
    return found


def preset_name(spec: str) -> str:
    """``path+k=v+...`` → a directory-safe name: the file's stem, then the overrides."""
    path, *overrides = spec.split("+")
    name = "_".join([Path(path).stem, *overrides])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def run_stages(preset: list[str], stage2: list[str]) -> list[str]:
    """[doctor if the preset has it,] train, extract, the preset's own stage-2 stages (e.g. mpfa), then
    ``stage2``'s others, evaluate."""
    checks = [s for s in preset if s == "doctor"]
    own = [s for s in preset if s not in (*PIPELINE, *checks)]
    return [*checks, "train", "extract", *own, *(s for s in stage2 if s not in own), "evaluate"]


def plan_runs(presets: list[str], seeds: int, stage2: list[str], overrides: list[str], out: Path) -> list[PlannedRun]:
    """Every (preset, seed) with its validated config; raises ConfigError naming the preset."""
    names = [preset_name(spec) for spec in presets]
    if len(set(names)) != len(names):
        raise ConfigError([f"--presets: two presets share a name ({names}); give them different overrides"])
    runs = []
    for spec, name in zip(presets, names):
        path, *own = spec.split("+")
        for seed in range(seeds):
            fixed = [f"experiment={name}", f"trainer.seed={seed}", f"output.root={out / name}",
                     f"output.run_id=seed{seed}"]
            try:
                cfg = load_config(path, [*own, *overrides, *fixed])
                cfg.stages = run_stages(list(cfg.stages), stage2)
                validate_config(cfg)
            except ConfigError as exc:
                raise ConfigError([f"preset {spec}: {p}" for p in exc.problems]) from exc
            runs.append(PlannedRun(spec, seed, cfg, resolve_run_dir(cfg)))
    return runs


def _submit_local(pending: list[PlannedRun]) -> list[PlannedRun]:
    """Run each pending run to its end, one after another; return those that failed."""
    from ltdist.job import Job

    failed = []
    for i, run in enumerate(pending, 1):
        print(f"\n[{i}/{len(pending)}] {run.preset} seed {run.seed}: {run.run_dir}", flush=True)
        _write_config(run.cfg, run.run_dir)
        job = build_executor("local", run.cfg, run.run_dir / "logs").submit(Job(run.cfg, run.run_dir))
        if follow_job(job, "local") != 0:
            failed.append(run)
    return failed


def _submit_slurm(pending: list[PlannedRun], out: Path, parallelism: int, wait: bool) -> list[PlannedRun]:
    """One submitit job array of every pending run (launch.* of the runs must agree); waits when ``wait``."""
    from ltdist.job import Job

    launches = {OmegaConf.to_yaml(run.cfg.launch) for run in pending}
    if len(launches) > 1:
        raise ConfigError(["launch: one job array needs the same launch.* in every preset; set them as overrides"])
    executor = build_executor("slurm", pending[0].cfg, out / "logs")
    executor.update_parameters(slurm_array_parallelism=parallelism)
    for run in pending:
        _write_config(run.cfg, run.run_dir)
    with executor.batch():
        jobs = [executor.submit(Job(run.cfg, run.run_dir)) for run in pending]
    for run, job in zip(pending, jobs):
        print(f"job {job.job_id}: {run.preset} seed {run.seed} → {run.run_dir} (log {job.paths.stdout})")
    if not wait:
        return []
    return [run for run, job in zip(pending, jobs) if follow_job(job, "slurm") != 0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ltdist sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", metavar="PRESET",
                        help=f"preset files, each optionally +key=value... (default: every {DEFAULT_PRESETS} "
                             "that sets method.loss)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 per preset (default: 3)")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGE2),
                        help=f"stage-2 stages after train, extract and the preset's own "
                             f"(default: {','.join(DEFAULT_STAGE2)})")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory (default: runs/sweep)")
    parser.add_argument("--array-parallelism", type=int, default=16, help="Slurm: array tasks running at once")
    parser.add_argument("--no-wait", action="store_true",
                        help="Slurm: submit and return; run the same command again to compare once the jobs end")
    parser.add_argument("--claim", action="append", default=[], metavar="'STAGE1=ROW > STAGE1=ROW'",
                        help="a claim for the comparison to check, paired over seeds (see ltdist compare); repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.absolute()
    try:
        presets = args.presets or default_presets()
        if not presets:
            raise ConfigError([f"--presets: no preset given and none of {DEFAULT_PRESETS} sets method.loss"])
        if args.seeds < 1:
            raise ConfigError([f"--seeds: must be ≥ 1, got {args.seeds}"])
        runs = plan_runs(presets, args.seeds, [s for s in args.stages.split(",") if s], args.overrides, out)
        if args.cluster == "local" and any(run.cfg.launch.nodes != 1 for run in runs):
            raise ConfigError(["launch.nodes: the local executor runs on one node"])
    except ConfigError as exc:
        print(f"ltdist sweep: {exc}", file=sys.stderr)
        return 2
    pending = [run for run in runs if not run.done]
    print(f"sweep directory: {out}\n{len(runs)} runs ({len(presets)} presets × {args.seeds} seeds), "
          f"{len(runs) - len(pending)} already have report.json")
    for run in runs:
        print(f"  {'done   ' if run.done else 'pending'}  {run.preset} seed {run.seed}: {run.run_dir}")
    if args.dry_run:
        return 0
    failed: list[PlannedRun] = []
    if pending and args.cluster == "local":
        failed = _submit_local(pending)
    elif pending:
        try:
            failed = _submit_slurm(pending, out, args.array_parallelism, wait=not args.no_wait)
        except ConfigError as exc:
            print(f"ltdist sweep: {exc}", file=sys.stderr)
            return 2
    finished = [run.run_dir for run in runs if run.done]
    for run in failed:
        print(f"failed: {run.preset} seed {run.seed}; its log is under {run.run_dir / 'logs'}", file=sys.stderr)
    if len(finished) < len(runs):
        print(f"{len(runs) - len(finished)} runs have no report yet; run the same command again to resume")
    if not finished:
        return 1 if failed else 0
    comparison = find_runs(finished)
    rows = compare_runs(comparison)
    try:
        paths = write_comparison(rows, comparison, out / "comparison", args.claim)
    except ValueError as exc:
        print(f"ltdist sweep: {exc}", file=sys.stderr)
        return 2
    print(f"\n{format_comparison(rows)}\n\n" + "\n".join(f"{suffix}: {path}" for suffix, path in paths.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
