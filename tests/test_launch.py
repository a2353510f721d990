"""The launcher: --dry-run sbatch text, and real doctor jobs through the local executor and local Slurm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from data_fixtures import fmnist_lt  # noqa: F401

from ltdist.cli import main as cli_main
from ltdist.config import load_config
from ltdist.data import read_index
from ltdist.job import Job
from ltdist.launch import main as launch_main

REPO = Path(__file__).resolve().parents[1]


def launch(args: list[str], cwd: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """`python -m ltdist.launch ARGS` as a user runs it, in its own process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ltdist.launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def read_doctor(root: Path) -> dict:
    reports = list(root.glob("*/*/doctor.json"))
    assert len(reports) == 1, f"expected one doctor.json under {root}, found {reports}"
    return json.loads(reports[0].read_text())


def test_dry_run_prints_config_and_sbatch_lines(tmp_path, capsys):
    root = tmp_path / "runs"
    code = launch_main([
        "--cluster", "slurm", "--dry-run", f"output.root={root}", "experiment=dry", "output.run_id=r1",
        "launch.nodes=2", "launch.tasks_per_node=4", "launch.gpus_per_node=4", "launch.cpus_per_task=3",
        "launch.mem_gb=64", "launch.time_min=30", "launch.partition=gpu", "launch.account=proj",
        "launch.qos=high", "launch.constraint=h100", "launch.job_name=ltx", "trainer.batch_size=64",
        "launch.additional_parameters.exclusive=true", "launch.additional_parameters.mail_type=END",
    ])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=3", "--mem=64GB",
                 "--time=30", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=h100",
                 "--job-name=ltx", "--exclusive", "--mail-type=END", "--signal=USR2@"):
        assert f"#SBATCH {line}" in out, f"missing #SBATCH {line}"
    assert "srun" in out and "submitit" in out
    assert "partition: gpu" in out and "batch_size: 64" in out  # the resolved config is printed too
    assert str(root / "dry" / "r1") in out
    assert not root.exists(), "--dry-run must not create the run directory"


def test_inat2018_preset_dry_run_on_two_nodes_of_eight_gpus(tmp_path, capsys):
    """The iNaturalist preset resolves for 2 × 8 GPUs with the batch, learning rate and sbatch lines it says."""
    code = launch_main(["--cluster", "slurm", "--dry-run", "--config", str(REPO / "configs/experiment/inat2018.yaml"),
                        f"output.root={tmp_path}", f"data.shards={tmp_path / 'no_shards'}"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=480GB",
                 "--time=2880"):
        assert f"#SBATCH {line}" in out, f"missing #SBATCH {line}"
    assert "# ranks: 2 node(s) × 8 = 16 (8 GPUs per node)" in out
    assert "# batch: 1024 global = 64 per rank × 16 ranks × 1 accumulation step(s)" in out
    assert "# learning rate: 0.4 = 0.4 at batch 1024, linear scaling to 1024" in out
    assert "zero_optimization={'stage': 2" in out and "precision bf16" in out
    assert "arch: resnet50" in out and "image_size: 224" in out


def test_dry_run_counts_steps_from_existing_shards(fmnist_lt, tmp_path, capsys):  # noqa: F811
    code = launch_main(["--cluster", "local", "--dry-run", f"data.shards={fmnist_lt.parent}",
                        f"output.root={tmp_path}", "launch.tasks_per_node=2", "trainer.batch_size=128",
                        "optim.lr=0.1", "optim.lr_reference_batch=256", "optim.lr_scaling=sqrt"])
    out = capsys.readouterr().out
    assert code == 0
    steps = sum(read_index(fmnist_lt).train_counts) // 128
    assert f"# data: 10 classes, {sum(read_index(fmnist_lt).train_counts)} train images → {steps} steps" in out
    assert "stopped at trainer.max_steps" not in out
    assert "# batch: 128 global = 64 per rank × 2 ranks" in out
    assert f"# learning rate: {0.1 * 0.5 ** 0.5:g} = 0.1 at batch 256, sqrt scaling" in out
    assert launch_main(["--cluster", "local", "--dry-run", f"data.shards={fmnist_lt.parent}", f"output.root={tmp_path}",
                        "trainer.batch_size=128", "trainer.epochs=2", "trainer.max_steps=5"]) == 0
    assert f"{2 * steps} in 2 epoch(s), stopped at trainer.max_steps=5" in capsys.readouterr().out


def test_dry_run_refuses_a_batch_that_does_not_divide(tmp_path, capsys):
    code = launch_main(["--cluster", "slurm", "--dry-run", f"output.root={tmp_path}", "launch.nodes=2",
                        "launch.tasks_per_node=3", "trainer.batch_size=100"])
    assert code == 2 and "not divisible" in capsys.readouterr().err


def test_local_doctor_two_ranks(tmp_path):
    root = tmp_path / "runs"
    result = launch(["--cluster", "local", "stages=[doctor]", "launch.tasks_per_node=2", f"output.root={root}",
                     "experiment=local-doctor"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job id:" in result.stdout and "completed" in result.stdout
    report = read_doctor(root)
    assert report["world_size"] == 2
    assert report["all_reduce"]["result"] == 3.0 and report["all_reduce"]["ok"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert report["backend"] == "gloo"
    assert report["versions"]["torch"] and report["versions"]["submitit"]
    assert (root / "local-doctor").is_dir()
    config = next(root.glob("local-doctor/*/config.yaml")).read_text()
    assert "tasks_per_node: 2" in config


@pytest.mark.slurm
def test_slurm_doctor_two_tasks(local_slurm_cluster, tmp_path):
    root = tmp_path / "runs"
    result = launch(["--cluster", "slurm", "stages=[doctor]", "launch.tasks_per_node=2", "launch.time_min=5",
                     f"launch.partition={local_slurm_cluster.partition}", f"output.root={root}", "--wait"],
                    cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("job id:"))
    assert job_id.isdigit()
    report = read_doctor(root)
    assert report["world_size"] == 2
    assert report["all_reduce"] == {"op": "sum of rank+1", "result": 3.0, "expected": 3.0, "ok": True}
    assert report["hostnames"] == [local_slurm_cluster.node]
    assert "doctor: world size 2" in result.stdout  # --wait followed rank 0's log


def test_checkpoint_resubmits_the_same_job(tmp_path):
    cfg = load_config(None, ["stages=[doctor]"])
    job = Job(cfg, tmp_path / "run")
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, Job)
    assert delayed.function.run_dir == job.run_dir
    assert list(delayed.function.cfg.stages) == ["doctor"]


def test_cli_dispatches_launch_and_rejects_unknown(capsys):
    assert cli_main(["launch", "--cluster", "local", "--dry-run", "optim.lr=0.3"]) == 0
    assert "lr: 0.3" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.slurm
def test_slurm_wait_reports_a_failing_job(local_slurm_cluster, tmp_path):
    # `evaluate` in an empty run directory has nothing to evaluate: the job fails on its ranks.
    root = tmp_path / "runs"
    result = launch(["--cluster", "slurm", "stages=[evaluate]", "launch.time_min=5", f"output.root={root}", "--wait"],
                    cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stderr
