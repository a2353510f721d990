"""Numerics guard: non-finite losses skip their step; K in a row stop the run; no non-finite checkpoint."""

from __future__ import annotations

import torch
from torch import nn


class NonFiniteLossError(RuntimeError):
    """Raised when ``max_consecutive`` optimizer steps in a row had a non-finite loss."""


class NonFiniteGuard:
    """Counts skipped (non-finite) steps. ``record(finite)`` is called once per micro-step with the
    decision all ranks agreed on, so every rank skips and stops together."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"trainer.max_nonfinite_steps must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0
        self.last_checkpoint: str | None = None  # set by the trainer at each save / resume, for the message

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            where = (f"the last checkpoint, {self.last_checkpoint}, is intact" if self.last_checkpoint else
                     "no checkpoint was written yet, so a relaunch starts from step 0")
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive non-finite losses (at step {step}, {self.skipped} skipped in "
                f"total; limit trainer.max_nonfinite_steps={self.max_consecutive}): stopping. Lower optim.lr, "
                f"enable optim.grad_clip or check the data; {where}.")

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.skipped = int(state["consecutive"]), int(state["skipped"])


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN or ±inf (checked before any checkpoint is written)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
