"""A watchdog for the waits a rank cannot see past: a stage's start-up logs what it is waiting for.

A rank that blocks in start-up (joining the process group, a build lock left by a killed process, a
barrier another rank never reaches) is otherwise silent until the job's time limit. :func:`watchdog`
logs a warning after ``first_s`` seconds and then every ``every_s`` seconds while its block runs: what
the block waits for, optional details computed at that moment, and where the waiting thread is.
:class:`StallWatchdog` does the same for the training loop and, past ``trainer.stall_timeout_s``, fails
the rank instead of waiting for the process group's 30-minute timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("ltdist.watchdog")


def _where(thread_id: int, depth: int = 4) -> str:
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "?"
    stack = traceback.extract_stack(frame)[-depth:]
    return " <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in reversed(stack))


@contextmanager
def watchdog(what: str, first_s: float = 60.0, every_s: float = 120.0,
             details: Callable[[], str] | None = None) -> Iterator[None]:
    """Run the ``with`` block; while it is still running after ``first_s`` s (then every ``every_s`` s) log
    ``what`` it waits for, ``details()`` and the waiting thread's innermost frames. Never interrupts it."""
    done = threading.Event()
    waiting = threading.get_ident()
    started = time.monotonic()

    def watch() -> None:
        timeout = first_s
        while not done.wait(timeout):
            extra = ""
            if details is not None:
                try:
                    extra = details()
                except Exception as e:  # a broken diagnostic must not take the rank down
                    extra = f"(details failed: {e})"
            log.warning("still waiting after %.0f s: %s%s; at %s", time.monotonic() - started, what,
                        f"; {extra}" if extra else "", _where(waiting))
            timeout = every_s

    thread = threading.Thread(target=watch, name=f"watchdog: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


STALL_EXIT_CODE = 3  # a rank that stopped its job because training stalled (trainer.stall_timeout_s)


class StallWatchdog:
    """Fails a rank whose training loop made no progress for ``timeout_s`` seconds (a hung or stopped peer
    blocks every rank in the next collective; without this the job waits for the process group's timeout).

    The loop calls :meth:`tick` with what it is about to do. A thread writes this rank's heartbeat
    (``<directory>/rank<r>.json``: step, what, last progress, time) every ``timeout_s / 4`` seconds (at most
    30). When the loop's last tick is older than ``timeout_s``, the thread logs what this rank waits for
    and where, and every peer's state from its heartbeat (a peer whose heartbeat stopped too is stopped or
    dead: named as such), SIGKILLs such peers when they run on its host (else, under Slurm, cancels the job)
    and ends the process with :data:`STALL_EXIT_CODE`; the launcher then reports the failed rank.
    Heartbeat times are wall clock: the ranks' hosts must agree on the time (NTP). A process that was
    stopped as a whole (``scontrol suspend``, SIGSTOP, a paused VM) notices the gap in its own loop when it
    resumes and starts its stall clock again instead of failing the job.
    """

    def __init__(self, timeout_s: float, directory: Path, rank: int, world_size: int,
                 exit: Callable[[int], None] = os._exit):
        self.timeout_s, self.directory, self.rank, self.world_size = timeout_s, Path(directory), rank, world_size
        self._exit = exit
        self.step, self.what = 0, "starting"
        self._last = time.monotonic()
        self._last_wall = time.time()
        self._done = threading.Event()
        self._waiting = threading.get_ident()
        self._thread: threading.Thread | None = None
        if timeout_s > 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._beat()
            self._thread = threading.Thread(target=self._watch, name="stall watchdog", daemon=True)
            self._thread.start()

    def tick(self, what: str, step: int) -> None:
        """Progress: the loop is about to do ``what`` at optimizer step ``step``."""
        self.what, self.step = what, step
        self._last, self._last_wall = time.monotonic(), time.time()

    def _beat(self) -> None:
        record = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
                  "what": self.what, "last_progress": self._last_wall, "time": time.time()}
        path = self.directory / f"rank{self.rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def _peers(self) -> tuple[list[str], list[int]]:
        """(a line per peer, pids of the peers on this host whose heartbeat stopped too)."""
        now, lines, stopped_here = time.time(), [], []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                beat = json.loads((self.directory / f"rank{rank}.json").read_text())
            except (OSError, ValueError):
                lines.append(f"rank {rank}: no heartbeat file (never started?)")
                continue
            silent = now - beat["time"]
            if silent > self.timeout_s / 2 and beat["host"] == socket.gethostname():
                stopped_here.append(int(beat["pid"]))
            state = (f"STOPPED OR DEAD: no heartbeat for {silent:.0f} s" if silent > self.timeout_s / 2
                     else f"alive, no progress for {now - beat['last_progress']:.0f} s")
            lines.append(f"rank {rank} ({beat['host']} pid {beat['pid']}): {state}; at step {beat['step']}, "
                         f"{beat['what']}")
        return lines, stopped_here

    def _watch(self) -> None:
        every = min(self.timeout_s / 4, 30.0)
        previous = time.monotonic()
        while not self._done.wait(every):
            now = time.monotonic()
            if now - previous > 2 * every + 5:
                # This loop itself did not run: the whole process was stopped (scontrol suspend, SIGSTOP, a
                # paused VM). The monotonic clock ran on meanwhile; counting that as a stall would fail the
                # job the moment it is resumed, so the stall clock starts again.
                log.warning("rank %d: this process did not run for %.0f s (suspended?); the stall clock "
                            "(trainer.stall_timeout_s=%g) starts again", self.rank, now - previous, self.timeout_s)
                self._last = now
            previous = now
            self._beat()
            idle = time.monotonic() - self._last
            if idle < self.timeout_s:
                continue
            peers, stopped_here = self._peers()
            log.error("rank %d: no training progress for %.0f s (trainer.stall_timeout_s=%g) at step %d, %s; at %s. "
                      "Peers: %s. Failing the job.", self.rank, idle, self.timeout_s, self.step, self.what,
                      _where(self._waiting, depth=6), "; ".join(peers) or "none")
            for handler in logging.getLogger().handlers:
                handler.flush()
            # A stopped peer would hold the job open until its time limit: end it (same host) or the job.
            for pid in stopped_here:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if os.environ.get("SLURM_JOB_ID") and shutil.which("scancel"):
                subprocess.run(["scancel", os.environ["SLURM_JOB_ID"]], check=False)
            self._exit(STALL_EXIT_CODE)
            return

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
