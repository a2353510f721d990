"""Learning rate as a function of the optimizer step: linear warm-up, then cosine decay to 0 (or constant)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """LR used by optimizer step ``step`` (0-based) of ``total_steps``; warm-up rises linearly to ``peak_lr``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))
