"""``ltdist sweep --cluster slurm`` on the real local Slurm cluster: the cells go out as one job array, a
cell preempted with ``scancel --signal=USR2`` requeues and finishes, and a re-run skips every finished cell
and writes the comparison."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import fmnist_lt  # noqa: F401  (a fixture, found by name)
from test_engine_slurm import _last_step, _wait_for

PRESET = str(Path(__file__).resolve().parents[1] / "configs" / "experiment" / "fmnist_lt.yaml")


def _sweep(args: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltdist.sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slurm
def test_sweep_array_preempted_cell_requeues_and_rerun_skips(local_slurm_cluster, fmnist_lt, tmp_path):  # noqa: F811
    cluster = local_slurm_cluster
    out = tmp_path / "sweep"
    overrides = [f"data.shards={fmnist_lt.parent}", "model.arch=resnet8", "trainer.batch_size=32", "trainer.epochs=1",
                 "trainer.max_steps=24", "trainer.log_every=2", "trainer.checkpoint_every=1000",
                 "data.num_workers=0", "trainer.device=cpu", "trainer.progress=false",
                 f"launch.partition={cluster.partition}", "launch.cpus_per_task=1", "launch.time_min=10"]
    args = [*overrides, "--cluster", "slurm", "--seeds", "2", "--stages", "ncm", "--out", str(out),
            "--presets", PRESET]
    submitted = _sweep([*args, "--no-wait"], tmp_path)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    jobs = dict(re.findall(r"^job (\S+): \S+ seed (\d)", submitted.stdout, re.M))
    assert len(jobs) == 2 and all(re.fullmatch(r"\d+_[01]", j) for j in jobs), submitted.stdout  # one array
    preempted = next(j for j, seed in jobs.items() if seed == "1")
    run_dir = out / "fmnist_lt" / "fmnist_lt" / "seed1"
    _wait_for(lambda: _last_step(run_dir) >= 4, 240, "training progress of the cell to preempt")
    cluster.preempt(preempted)
    for job in jobs:
        fields = cluster.wait_for_job(job, timeout_s=300)
        assert fields["JobState"] == "COMPLETED", (job, fields)
    events = [json.loads(line)["event"]
              for line in (run_dir / "checkpoints" / "requeue_log.jsonl").read_text().splitlines()]
    assert events == ["start", "preempted", "start"]

    again = _sweep(args, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 runs (1 presets × 2 seeds), 2 already have report.json" in again.stdout
    assert "job " not in again.stdout  # nothing submitted
    comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    assert sorted(r["seed"] for r in comparison["runs"]) == [0, 1]
    assert {m["stage2"] for m in comparison["methods"]} >= {"NCM", "ensemble"}
