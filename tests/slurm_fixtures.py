"""The local single-node Slurm cluster (slurm/local-cluster.sh) as a pytest fixture, plus job helpers.

tests/conftest.py registers the session fixture ``local_slurm_cluster``; a test just asks for it::

    @pytest.mark.slurm
    def test_x(local_slurm_cluster): ...

The fixture skips (with the reason) only when not root or when slurm-wlm/munge are missing; if the
cluster does not come up it fails. There is no accounting daemon, so job states come from
``scontrol show job`` (finished jobs stay visible for MinJobAge = 300 s), never from sacct.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local-cluster.sh"
REQUIRED_COMMANDS = ("slurmctld", "slurmd", "sinfo", "scontrol", "sbatch", "munged", "munge", "unmunge")
# Job states after which a job will not run again by itself (see squeue(1), JOB STATE CODES).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


@dataclass(frozen=True)
class LocalSlurmCluster:
    """The local cluster: its directory (config, state, logs), node and partition names, job helpers."""

    dir: Path
    node: str
    partition: str = "local"

    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "slurm.conf"

    def run_script(self, action: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
        """Run ``slurm/local-cluster.sh ACTION``; stdout and stderr are merged into ``.stdout``."""
        return subprocess.run(
            ["bash", str(SCRIPT), action],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "LTDIST_SLURM_DIR": str(self.dir)},
        )

    def daemon_pid(self, daemon: str) -> int:
        """Pid of ``slurmctld`` or ``slurmd`` from its pid file."""
        return int((self.dir / "run" / f"{daemon}.pid").read_text())

    @staticmethod
    def job_fields(job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, StdOut, ...); empty if the job is unknown."""
        out = subprocess.run(
            ["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30
        ).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def preempt(self, job_id: str, timeout_s: float = 150) -> None:
        """Signal the job as at its time limit (USR2 to every task, where submitit's handler is, hence not
        --batch), wait until it is requeued (Restarts=1, PENDING) and let it start again at once."""
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        deadline = time.monotonic() + timeout_s
        while True:
            fields = self.job_fields(job_id)
            if fields.get("Restarts") == "1" and fields.get("JobState") == "PENDING":
                break
            if time.monotonic() > deadline:
                state = fields.get("JobState")
                raise TimeoutError(f"job {job_id} not requeued {timeout_s} s after USR2 (state {state})")
            time.sleep(0.5)
        time.sleep(2)  # slurmd refuses a restart within the second of the credential revocation
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    def wait_for_job(self, job_id: str | int, timeout_s: float = 60, poll_s: float = 0.25) -> dict[str, str]:
        """Poll until the job reaches a final state; return its fields. TimeoutError names the last state."""
        deadline = time.monotonic() + timeout_s
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in FINAL_STATES:
                return fields
            time.sleep(poll_s)
        raise TimeoutError(
            f"Slurm job {job_id} not finished after {timeout_s} s (state {fields.get('JobState', 'unknown')})"
        )


def slurm_unavailable_reason() -> str | None:
    """Why the local cluster cannot be started here, or None when it can (root + packages)."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (it starts munged, slurmctld and slurmd)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [cmd for cmd in REQUIRED_COMMANDS if shutil.which(cmd, path=path) is None]
    if missing:
        return f"{', '.join(missing)} missing: apt-get install -y slurm-wlm munge"
    return None


@pytest.fixture(scope="session")
def local_slurm_cluster() -> Iterator[LocalSlurmCluster]:
    """Start the local cluster for the session; stop it afterwards unless it was running before."""
    reason = slurm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    cluster = LocalSlurmCluster(dir=Path(os.environ.get("LTDIST_SLURM_DIR", "/var/lib/ltdist-slurm")), node=node)
    was_running = cluster.run_script("status").returncode == 0
    started = cluster.run_script("start")
    if started.returncode != 0:
        pytest.fail(f"slurm/local-cluster.sh start failed:\n{started.stdout}")
    yield cluster
    if not was_running:
        cluster.run_script("stop")
