"""The preemption path on the real local Slurm cluster: a 2-task train job is signalled as at its time limit
(``scancel --signal=USR2``, what submitit forwards and handles), saves, requeues itself through
``Job.checkpoint`` and finishes with the same final weights as an uninterrupted job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS = 40
TRAIN = ["stages=[train]", "model.arch=resnet20", "trainer.batch_size=32", "trainer.epochs=1",
         f"trainer.max_steps={STEPS}", "trainer.log_every=2", "trainer.checkpoint_every=1000", "optim.lr=0.8",
         "optim.warmup_epochs=0", "data.num_workers=0", "data.shuffle_buffer=300", "trainer.device=cpu",
         "launch.tasks_per_node=2", "launch.time_min=10"]


def _launch(args: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ltdist.launch", "--cluster", "slurm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not seen after {timeout_s} s")


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if "loss" in line]
    return max(steps, default=0)


@pytest.mark.slurm
def test_usr2_saves_requeues_and_matches_uninterrupted(local_slurm_cluster, tmp_path):
    from ltdist.data import ensure_shards

    cluster = local_slurm_cluster
    root, shards = tmp_path / "runs", tmp_path / "shards"
    from omegaconf import OmegaConf

    from ltdist.config.schema import DataConfig

    ensure_shards(OmegaConf.structured(DataConfig(shards=str(shards))))
    common = [*TRAIN, f"launch.partition={cluster.partition}", f"output.root={root}", f"data.shards={shards}",
              "experiment=slurm_preempt"]

    straight = _launch([*common, "output.run_id=straight", "--wait"], tmp_path)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    submitted = _launch([*common, "output.run_id=preempted"], tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = next(line.split()[-1] for line in submitted.stdout.splitlines() if line.startswith("job id:"))
    run_dir = root / "slurm_preempt" / "preempted"
    _wait_for(lambda: _last_step(run_dir) >= 4, 180, "training progress of the job to preempt")
    cluster.preempt(job_id)  # rank 1 waits in requeue_and_exit until Slurm kills it, then the job requeues
    fields = cluster.wait_for_job(job_id, timeout_s=240)
    assert fields["JobState"] == "COMPLETED", fields

    events = [json.loads(line) for line in (run_dir / "checkpoints" / "requeue_log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "preempted", "start"]
    assert 4 <= events[1]["step"] == events[2]["step"] < STEPS  # saved inside the run, resumed from there
    a = torch.load(root / "slurm_preempt" / "straight" / "weights" / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "weights" / "final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
