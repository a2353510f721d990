"""One writer per run directory, and a rendezvous only this machine can reach.

A real local 2-rank train job through ``python -m ltdist.launch``: while it runs, a second launch into the
same run is refused naming the holder, and every socket its ranks listen on is bound to loopback; then
rank 1 is killed and the launcher's last line names rank 1 (not rank 0, whose error is only the lost peer).
Lock rules (stale holders, requeue) are checked on the lock file itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import fmnist_lt  # noqa: F401  (a fixture, found by name)

from ltdist import runlock


def _launch(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ltdist.launch", "--cluster", "local", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process ``pid`` listens on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return found


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"{what} not seen after {timeout_s} s")


def _beats(run_dir: Path) -> list[dict] | None:
    try:
        beats = [json.loads((run_dir / "heartbeats" / f"rank{r}.json").read_text()) for r in range(2)]
    except (OSError, ValueError):
        return None
    return beats  # written when training starts (after the process group and the engine exist)


def test_second_launch_is_refused_ranks_listen_on_loopback_and_a_killed_rank_is_named(fmnist_lt, tmp_path):  # noqa: F811
    common = ["stages=[train]", f"data.shards={fmnist_lt.parent}", f"output.root={tmp_path}", "experiment=lock",
              "output.run_id=r", "model.arch=resnet8", "trainer.batch_size=32", "trainer.max_steps=400",
              "trainer.epochs=2", "trainer.checkpoint_every=1000", "data.num_workers=0", "trainer.progress=false",
              "launch.tasks_per_node=2", "trainer.device=cpu"]
    run_dir = tmp_path / "lock" / "r"
    first = _launch(common, tmp_path)
    try:
        beats = _wait_for(lambda: _beats(run_dir), 240, "both ranks training")
        holder = runlock.read_holder(run_dir)
        assert holder.state == "running" and holder.pid == beats[0]["pid"]
        for beat in beats:
            addresses = _listening(beat["pid"])
            assert addresses, f"rank {beat['rank']} listens on nothing?"
            assert all(a.startswith("127.0.0.1:") for a in addresses), (beat["rank"], addresses)
        second = _launch(common, tmp_path)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, out + err
        assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in err and "running" in err, err
        os.kill(beats[1]["pid"], signal.SIGKILL)  # rank 1 dies: the launcher must name it, not rank 0
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1, out[-3000:] + err[-3000:]
    # rank 0's traceback is only the lost connection: the launcher names rank 1 and its log
    assert "rank 1 ended without logging an error while rank 0 lost its connection to it" in err, err[-3000:]
    assert f"see its log: {run_dir / 'logs'}/" in err and "_1_log.out" in err, err[-3000:]
    assert runlock.read_holder(run_dir) is None  # released at the end


def test_stale_locks_are_taken_over_and_a_requeue_takes_its_own_back(tmp_path, monkeypatch):
    token = runlock.new_token()
    runlock.acquire(tmp_path, token, "submitting")
    with pytest.raises(runlock.RunLocked, match=f"in use by pid {os.getpid()}"):
        runlock.acquire(tmp_path, runlock.new_token(), "submitting")
    # the same token (the job this launch submitted, or its requeue after a preemption) takes it back
    runlock.acquire(tmp_path, token, "running", slurm_job_id="77")
    assert runlock.read_holder(tmp_path).slurm_job_id == "77"
    # a Slurm job still queued is alive however old its heartbeat; once Slurm forgot it, it is stale
    runlock.update(tmp_path, token, heartbeat=time.time() - 2 * runlock.STALE_S)
    with pytest.raises(runlock.RunLocked, match="Slurm job 77"):
        runlock.acquire(tmp_path, runlock.new_token(), "submitting", slurm_state=lambda job: "PENDING")
    other = runlock.new_token()
    runlock.acquire(tmp_path, other, "submitting", slurm_state=lambda job: None)
    assert runlock.read_holder(tmp_path).token == other
    # a local holder whose pid is gone is stale at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runlock.update(tmp_path, other, pid=dead.pid, slurm_job_id="")
    runlock.acquire(tmp_path, token, "submitting")
    assert runlock.read_holder(tmp_path).token == token
    runlock.release(tmp_path, other)  # not ours any more: no-op
    assert runlock.read_holder(tmp_path) is not None
    runlock.release(tmp_path, token)
    assert runlock.read_holder(tmp_path) is None
