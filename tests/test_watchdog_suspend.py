"""The stall watchdog tells a stopped process from a stalled loop: a job suspended as a whole (``scontrol
suspend`` sends SIGSTOP to every process) must not fail the moment it is resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from ltdist.watchdog import STALL_EXIT_CODE

LOOP = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from ltdist.watchdog import StallWatchdog
    logging.basicConfig(level=logging.INFO)
    dog = StallWatchdog(float(sys.argv[2]), Path(sys.argv[1]), rank=0, world_size=1)
    print("started", flush=True)
    for step in range(int(sys.argv[3])):
        dog.tick("training", step)
        # A step of 1 s of this process's CPU time: a stopped process does not advance it, so after a
        # resume the step is still running, as a training step would be.
        busy = time.process_time() + 1.0
        while time.process_time() < busy:
            pass
        if len(sys.argv) > 4 and step == 2:
            time.sleep(float(sys.argv[4]))  # the loop itself stalls; the watchdog thread runs on
    dog.close()
    print("finished", flush=True)
""")


def _start(tmp_path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path / "beats"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    return proc


def test_a_process_suspended_longer_than_the_timeout_resumes_and_finishes(tmp_path):
    proc = _start(tmp_path, "6", "5")  # timeout 6 s (the watchdog looks every 1.5 s); 5 steps of 1 s
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(14)  # stopped for more than twice the timeout, mid-step
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "finished" in out
    assert "did not run for" in err and "starts again" in err


def test_a_stalled_loop_still_fails_within_the_timeout(tmp_path):
    proc = _start(tmp_path, "6", "20", "60")  # the loop sleeps 60 s at step 2, the timeout is 6 s
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == STALL_EXIT_CODE, err
    assert time.monotonic() - started < 20
    assert "no training progress" in err and "did not run for" not in err
