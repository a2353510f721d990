"""Requeue bookkeeping in ``checkpoints/requeue_log.jsonl``: one line per job start and per preemption.

A job that was requeued after a preemption and is preempted again at the very step it resumed from made
no progress; requeueing it again would loop until the requeue budget is gone, so it stops with an error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

LOG_NAME = "requeue_log.jsonl"


class NoProgressError(RuntimeError):
    """A requeued job was preempted again before completing a single step."""


def read_events(root: Path) -> list[dict]:
    path = root / LOG_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_event(root: Path, event: str, step: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOG_NAME, "a") as f:
        f.write(json.dumps({"event": event, "step": step, "time": time.time()}) + "\n")


def is_requeue(events: list[dict]) -> bool:
    """True when the previous job of this run directory ended in a preemption (so this one is its requeue)."""
    return bool(events) and events[-1]["event"] == "preempted"


def check_progress(started_as_requeue: bool, start_step: int, step: int) -> None:
    if started_as_requeue and step <= start_step:
        raise NoProgressError(
            f"preempted again at step {step}, the step this requeued job resumed from: no progress since "
            f"the previous requeue. Stopping instead of requeueing in a loop; raise launch.time_min or "
            f"check why the job cannot complete a step before its time limit.")
