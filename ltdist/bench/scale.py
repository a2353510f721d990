"""The iNaturalist-2018 rehearsal: ``ltdist bench scale --out DIR [--config PRESET]``.

Runs every stage on the synthetic iNaturalist-shaped data (:mod:`ltdist.data.formats.synthetic`) at
several class counts (default 1 000 and 8 142, the same profile) and measures each stage as a user
would run it, in its own process tree: wall time, peak resident memory of the largest process (a rank,
a loader worker, the writer) and, for the launched stages, the stage's own time from rank 0's log.

Stages: ``shards`` (``ltdist shards synthetic``), ``stats`` (``ltdist stats``, every rank's stream for one
epoch, no decoding), ``train`` / ``extract`` / ``kt`` / ``evaluate`` (``ltdist launch --cluster local``
with the preset ``--config`` (default: a checkout's ``configs/experiment/synthetic_inat.yaml``, next to the
package), one stage per launch in one run directory) and ``mpfa``
(``ltdist bench mpfa``: MPFA's set-up and a few generation + retrain batches on an iNaturalist-shaped
d = 2048 bank of the same class count).

The table puts the smallest class count first as the baseline: per stage the time ratio, the ratio of
the work the stage does (images, class pairs, test samples × classes, ...) and their quotient, which is
about 1 for a stage linear in its work (fixed start-up costs pull it below 1). Results are written to
``DIR/results.json`` after every stage (the table to ``DIR/table.txt`` at the end); ``--resume`` skips
what it already holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ltdist
from ltdist.bench.harness import add_out_argument, time_once, write_results
from ltdist.data.formats import synthetic
from ltdist.data.index import read_index
from ltdist.data.stats import emission_check

# The preset ships with a checkout, not with the package: found next to the package (an editable install),
# else named with --config.
PRESET = Path("configs") / "experiment" / "synthetic_inat.yaml"
LAUNCHED = ("train", "extract", "kt", "evaluate")
STAGES = ("shards", "stats", *LAUNCHED, "mpfa")
WORK_UNITS = {"shards": "images written", "stats": "samples emitted", "train": "images trained + validated",
              "extract": "images embedded", "kt": "class pairs (C²)", "evaluate": "test samples × classes",
              "mpfa": "bank features"}
_STAGE_DONE = re.compile(r"\[rank 0\] .*stage (\w+) done in ([0-9.]+) s")


def measure(cmd: list[str], log_path: Path, stdout_path: Path | None = None) -> dict:
    """Run ``cmd`` (stderr, and stdout unless ``stdout_path``, to ``log_path``); wall seconds and the peak RSS
    (GiB) of its largest process. Raises RuntimeError with the log's tail when it fails."""
    waited = {}

    def run() -> None:
        with open(log_path, "w") as log, open(stdout_path or os.devnull, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out if stdout_path else log, stderr=log)
            # wait4's rusage covers the child and every descendant it waited for: ru_maxrss is the largest of them.
            _, waited["status"], waited["usage"] = os.wait4(proc.pid, 0)

    wall = time_once(run)
    status, usage = waited["status"], waited["usage"]
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (see {log_path}):\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}


def stage_seconds(run_dir: Path, stage: str) -> float | None:
    """The stage's own time, from rank 0's "stage X done in Y s" line of the newest launch."""
    logs = sorted((run_dir / "logs").glob("*_0_log.out"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    found = [float(m.group(2)) for m in _STAGE_DONE.finditer(logs[-1].read_text(errors="replace"))
             if m.group(1) == stage]
    return found[-1] if found else None


def stage_command(stage: str, classes: int, work: Path, args: argparse.Namespace) -> list[str]:
    shards = work / "shards"
    py = [sys.executable, "-m"]
    if stage == "shards":
        return [*py, "ltdist.cli", "shards", "synthetic", "--classes", str(classes), "--out", str(shards),
                "--workers", str(args.shard_workers), "--no-progress"]
    if stage == "stats":
        return [*py, "ltdist.cli", "stats", "--index", str(shards), "--ranks", str(args.ranks), "--batch-size",
                str(args.batch_size // args.ranks), "--no-decode", "--json"]
    if stage == "mpfa":  # a bank with the train split's counts
        return [*py, "ltdist.cli", "bench", "mpfa", "--classes", str(classes), "--total",
                str(sum(read_index(shards).train_counts)), "--out", str(work / "mpfa_bench")]
    return [*py, "ltdist.launch", "--cluster", "local", "--config", str(args.config), f"data.shards={shards}",
            f"output.root={work / 'runs'}", "output.run_id=rehearsal", f"stages=[{stage}]",
            # max_steps, not the epoch count, ends training at every class count
            f"trainer.max_steps={args.steps}", f"trainer.epochs={args.steps}",
            f"trainer.batch_size={args.batch_size}", f"launch.tasks_per_node={args.ranks}",
            "trainer.progress=false"]


def stage_work(stage: str, classes: int, work: Path, args: argparse.Namespace) -> int:
    """The amount of work of ``stage`` in the unit of :data:`WORK_UNITS`."""
    index = read_index(work / "shards")
    if stage in ("shards", "extract"):
        return sum(sum(c) for c in index.counts.values())
    if stage == "stats":
        return json.loads((work / "stats.json").read_text())["emitted_total"]
    if stage == "train":
        # validation runs at every epoch end and after the last step: its images are work too
        per_epoch = json.loads((work / "stats.json").read_text())["batches_per_rank_per_epoch"]
        passes = -(-args.steps // per_epoch)
        return args.steps * args.batch_size + passes * sum(index.counts.get("val", []))
    if stage == "kt":
        return classes * classes
    if stage == "evaluate":
        return sum(index.counts["test"]) * classes
    return sum(index.train_counts)  # mpfa: the bench's bank has the train split's counts


def stream_check(work: Path) -> dict:
    """How far the stream's per-class emissions fall from q_j · total (from ``ltdist stats``)."""
    stats = json.loads((work / "stats.json").read_text())
    missing, worst = emission_check(stats["emitted_counts"], stats["expected_counts"])
    return {"classes_never_emitted": missing, "max_abs_z": round(worst, 2),
            "batches_per_rank": stats["batches_per_rank_per_epoch"]}


def format_table(result: dict) -> str:
    """A Markdown table: stage × class counts, wall time and peak RSS, ratios against the first count."""
    counts = [str(c) for c in result["classes"]]
    base, top = counts[0], counts[-1]
    head = (f"| Stage | Work ({top} vs {base}) | Time {base} (s) | Time {top} (s) | Time ratio | Work ratio | "
            f"Time / work | Peak RSS {base} (GiB) | Peak RSS {top} (GiB) |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        rows = [result["runs"].get(c, {}).get(stage) for c in (base, top)]
        if None in rows:
            continue
        lo, hi = rows
        t_lo, t_hi = (r.get("stage_s") or r["wall_s"] for r in rows)
        time_ratio, work_ratio = t_hi / t_lo, hi["work"] / lo["work"]
        lines.append(f"| {stage} | {WORK_UNITS[stage]} | {t_lo:.1f} | {t_hi:.1f} | {time_ratio:.2f} | "
                     f"{work_ratio:.2f} | {time_ratio / work_ratio:.2f} | {lo['peak_rss_gib']:.2f} | "
                     f"{hi['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltdist bench scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p, "scale")
    p.add_argument("--config", type=Path, default=None, metavar="PRESET",
                   help=f"the launched stages' preset (default: {PRESET} next to the installed package)")
    p.add_argument("--work-dir", type=Path, default=Path("scale_rehearsal"),
                   help="shards and run directories, one sub-directory per class count")
    p.add_argument("--classes", type=int, nargs="+", default=[1000, synthetic.INAT_CLASSES])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="train steps (the same at every class count)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--shard-workers", type=int, default=2, help="shard-writer processes")
    p.add_argument("--resume", action="store_true", help="keep the stages --out already holds")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.config is None and set(args.stages) & set(LAUNCHED):
        args.config = Path(ltdist.__file__).resolve().parents[1] / PRESET
        if not args.config.is_file():
            p.error(f"the stages {[s for s in args.stages if s in LAUNCHED]} launch with the preset {PRESET}, which "
                    f"ships with a checkout, not with the installed package ({args.config} is missing): pass "
                    f"--config PATH (a checkout's {PRESET}, or a preset of your own)")
    saved = args.out / "results.json"
    previous = json.loads(saved.read_text()) if args.resume and saved.is_file() else {}
    result = {"cpus": previous.get("cpus", os.cpu_count()), "runs": previous.get("runs", {})}
    result["classes"] = sorted(args.classes)
    for classes in result["classes"]:
        work = args.work_dir.absolute() / f"classes_{classes}"
        work.mkdir(parents=True, exist_ok=True)
        runs = result["runs"].setdefault(str(classes), {})
        for stage in [s for s in STAGES if s in args.stages]:
            if stage in runs:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {classes} classes: {stage}", flush=True)
            run_dir = work / "runs" / "synthetic_inat" / "rehearsal"
            if stage == "train":  # a fresh run: never resume an interrupted rehearsal's checkpoint
                shutil.rmtree(work / "runs", ignore_errors=True)
            if stage == "extract":  # extract skips splits whose features are newer than the model
                shutil.rmtree(run_dir / "features", ignore_errors=True)
            row = measure(stage_command(stage, classes, work, args), work / f"{stage}.log",
                          work / "stats.json" if stage == "stats" else None)
            if stage in LAUNCHED:
                row["stage_s"] = stage_seconds(run_dir, stage)
            if stage == "stats":
                row["stream"] = stream_check(work)
            row["work"] = stage_work(stage, classes, work, args)
            runs[stage] = row
            print(f"  {json.dumps(row)}", flush=True)
            write_results(args.out, "scale", args, **result)
    table = format_table(result)
    result["table"] = table
    print(table)
    print(f"written to {write_results(args.out, 'scale', args, table, **result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
