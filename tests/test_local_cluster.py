"""slurm/local-cluster.sh: a real munged + slurmctld + slurmd on this machine runs a 2-task job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from slurm_fixtures import LocalSlurmCluster  # the fixture itself is registered by tests/conftest.py

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local-cluster.sh"


@pytest.mark.slurm
def test_start_twice_is_a_noop(local_slurm_cluster: LocalSlurmCluster) -> None:
    cluster = local_slurm_cluster
    before = (cluster.daemon_pid("slurmctld"), cluster.daemon_pid("slurmd"))
    again = cluster.run_script("start")
    assert again.returncode == 0, again.stdout
    assert "already running (no-op)" in again.stdout
    assert (cluster.daemon_pid("slurmctld"), cluster.daemon_pid("slurmd")) == before
    status = cluster.run_script("status")
    assert status.returncode == 0, status.stdout
    assert "idle" in status.stdout and "local*" in status.stdout  # the default partition


@pytest.mark.slurm
def test_generated_config_describes_this_machine(local_slurm_cluster: LocalSlurmCluster) -> None:
    conf = local_slurm_cluster.conf.read_text()
    assert f"SlurmctldHost={local_slurm_cluster.node}\n" in conf
    assert f"NodeName={local_slurm_cluster.node} CPUs={os.cpu_count()} " in conf
    assert "JobRequeue=1\n" in conf and "ProctrackType=proctrack/linuxproc\n" in conf
    node = subprocess.run(
        ["scontrol", "show", "node", local_slurm_cluster.node], capture_output=True, text=True, check=True
    ).stdout
    assert f"CPUTot={os.cpu_count()} " in node


@pytest.mark.slurm
def test_two_task_job_completes(local_slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    sbatch = ["sbatch", "--parsable", "--ntasks=2", "--mem=100M", "--time=1"]
    sbatch += [f"--output={tmp_path}/job-%j.out", "--wrap", "srun hostname"]
    job_id = subprocess.run(sbatch, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    fields = local_slurm_cluster.wait_for_job(job_id, timeout_s=45)
    assert fields["JobState"] == "COMPLETED", fields
    assert fields["ExitCode"] == "0:0"
    assert fields["NumTasks"] == "2"
    lines = (tmp_path / f"job-{job_id}.out").read_text().split()
    assert lines == [local_slurm_cluster.node] * 2  # one line per task


@pytest.mark.slurm
def test_stop_then_status_reports_down_and_start_recovers(local_slurm_cluster: LocalSlurmCluster) -> None:
    cluster = local_slurm_cluster
    stopped = cluster.run_script("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout
    status = cluster.run_script("status")
    assert status.returncode == 3, status.stdout
    assert "slurmctld  stopped" in status.stdout
    again = cluster.run_script("stop")
    assert again.returncode == 0 and "not running (no-op)" in again.stdout, again.stdout
    restarted = cluster.run_script("start")  # other tests reuse the cluster after this one
    assert restarted.returncode == 0, restarted.stdout
    assert cluster.run_script("status").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the script as another user")
def test_non_root_gets_a_clear_error() -> None:
    run_as_nobody = ["runuser", "-u", "nobody", "--", "bash", str(SCRIPT), "start"]
    result = subprocess.run(run_as_nobody, capture_output=True, text=True, timeout=30)
    if "missing" in result.stderr:
        pytest.skip("slurm-wlm/munge not installed (the package check runs first)")
    assert result.returncode == 1
    assert "must run as root" in result.stderr


def test_missing_packages_name_the_apt_command() -> None:
    # /usr/sbin (slurmctld, slurmd, munged) is off this PATH, so the script must find them missing.
    no_sbin = {"PATH": "/nonexistent:/bin"}
    result = subprocess.run(["/bin/bash", str(SCRIPT), "start"], capture_output=True, text=True, env=no_sbin)
    assert result.returncode == 1
    assert "slurmctld" in result.stderr
    assert "apt-get install -y slurm-wlm munge" in result.stderr
