"""One writer per run directory: ``<run_dir>/run.lock``, taken at submit time and held by the job.

flock/fcntl locks are not reliable on the shared filesystems run directories live on (NFS without a
lock daemon, Lustre mounted without ``flock``), so the lock is a file created with ``O_CREAT | O_EXCL``
(atomic on NFSv3+ and Lustre) holding JSON: host, pid, Slurm job id, a token and a heartbeat time.

- ``ltdist launch`` creates it before submitting, with a fresh token the :class:`~ltdist.job.Job` carries;
  a second launch into the same run finds it and is refused, the holder named.
- The job's rank 0 takes it over at start when the token matches (its own launch, or the requeue of the
  same job after a preemption: submitit resubmits the same Job, token included) and rewrites the
  heartbeat every :data:`HEARTBEAT_S` seconds from a thread until the job ends, then removes it.
- A lock is stale, and taken over by the next launch, when its heartbeat is older than :data:`STALE_S`
  (a killed job stops beating), or, on the same host, when its pid no longer exists and it holds no Slurm
  job; a lock still waiting for its Slurm job to start is alive while ``scontrol`` knows the job as
  pending or running. The heartbeat needs the hosts' clocks to agree within minutes (NTP).

Taking over a stale lock renames it aside first (atomic) and then creates a new one with ``O_EXCL``, so
two launches racing for the same stale lock cannot both win the create.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLocked(RuntimeError):
    """The run directory is held by another live launch or job."""


@dataclass
class Holder:
    host: str
    pid: int
    slurm_job_id: str
    token: str
    heartbeat: float
    state: str  # "submitting" (the launcher) | "running" (the job)

    def describe(self) -> str:
        job = f"Slurm job {self.slurm_job_id}" if self.slurm_job_id else f"pid {self.pid}"
        return (f"{job} on {self.host} (pid {self.pid}, {self.state}, heartbeat "
                f"{max(time.time() - self.heartbeat, 0):.0f} s ago)")


def new_token() -> str:
    return uuid.uuid4().hex


def read_holder(run_dir: Path) -> Holder | None:
    """The current holder, or None when there is no lock (an unreadable lock counts as held, just created)."""
    return read_holder_file(Path(run_dir) / LOCK_NAME)


def read_holder_file(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # being written right now by its creator
        return Holder("?", 0, "", "", time.time(), "being created")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: Holder, slurm_state: Callable[[str], str | None] | None = None) -> bool:
    """True when ``holder`` can no longer be running (see the module docstring for the rules)."""
    if holder.slurm_job_id and slurm_state is not None:
        state = slurm_state(holder.slurm_job_id)
        if state in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED"):
            return False  # a queued (or requeued) job does not beat yet
    if time.time() - holder.heartbeat > STALE_S:
        return True
    return holder.host == socket.gethostname() and not holder.slurm_job_id and not _pid_alive(holder.pid)


def _write_new(path: Path, holder: Holder) -> bool:
    """Create ``path`` holding ``holder`` with O_EXCL; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder.__dict__, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _replace(path: Path, holder: Holder) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(holder.__dict__))
    os.replace(tmp, path)


def acquire(run_dir: Path, token: str, state: str, slurm_job_id: str = "",
            slurm_state: Callable[[str], str | None] | None = None) -> Holder:
    """Take the lock of ``run_dir`` for ``token``: create it, take over a stale one, or take back one that
    already carries ``token`` (the launch that submitted this job, or its previous run before a requeue).
    Raises :class:`RunLocked` naming the holder otherwise."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = Holder(socket.gethostname(), os.getpid(), slurm_job_id, token, time.time(), state)
    for _ in range(3):
        if _write_new(path, me):
            return me
        holder = read_holder(path.parent)
        if holder is None:
            continue  # released in between
        if holder.token == token:
            _replace(path, me)
            return me
        if not is_stale(holder, slurm_state):
            raise RunLocked(f"run directory {run_dir} is in use by {holder.describe()}; wait for it to end, "
                            f"cancel it, or launch into another output.run_id (lock file: {path})")
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue  # another launch took it over first; try again against the new holder
        moved = read_holder_file(aside)
        if moved is not None and moved.token != holder.token:  # we moved a lock created just now: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            aside.unlink(missing_ok=True)
            continue
        log.warning("taking over the stale lock of %s: %s", run_dir, holder.describe())
        aside.unlink(missing_ok=True)
    raise RunLocked(f"could not take the lock {path}: it changed hands repeatedly")


def update(run_dir: Path, token: str, **fields) -> None:
    """Rewrite fields of our own lock (e.g. the Slurm job id after submission); no-op if not ours."""
    path = Path(run_dir) / LOCK_NAME
    holder = read_holder(path.parent)
    if holder is not None and holder.token == token:
        _replace(path, Holder(**{**holder.__dict__, **fields}))


def release(run_dir: Path, token: str) -> None:
    """Remove the lock if it is still ours."""
    holder = read_holder(Path(run_dir))
    if holder is not None and holder.token == token:
        (Path(run_dir) / LOCK_NAME).unlink(missing_ok=True)


class HeldLock:
    """The job's hold on its run directory: a heartbeat thread until :meth:`close` (then released).

    If another process took the lock over (this job's heartbeat stopped for longer than ``STALE_S``),
    the thread logs it and stops beating instead of overwriting the new holder."""

    def __init__(self, run_dir: Path, token: str, slurm_job_id: str, every_s: float = HEARTBEAT_S):
        self.run_dir, self.token = Path(run_dir), token
        acquire(self.run_dir, token, "running", slurm_job_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(every_s,), name="run lock heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            holder = read_holder(self.run_dir)
            if holder is None or holder.token != self.token:
                log.error("the lock of %s was taken over by %s: this job no longer holds its run directory",
                          self.run_dir, holder.describe() if holder else "nobody (removed)")
                return
            update(self.run_dir, self.token, heartbeat=time.time())

    def close(self, release_lock: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if release_lock:
            release(self.run_dir, self.token)
