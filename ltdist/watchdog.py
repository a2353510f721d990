"""A watchdog for the waits a rank cannot see past: a stage's start-up logs what it is waiting for.

A rank that blocks in start-up (joining the process group, a build lock left by a killed process, a
barrier another rank never reaches) is otherwise silent until the job's time limit. :func:`watchdog`
logs a warning after ``first_s`` seconds and then every ``every_s`` seconds while its block runs: what
the block waits for, optional details computed at that moment, and where the waiting thread is.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
