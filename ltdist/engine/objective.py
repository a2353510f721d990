"""The stage-1 training objective: the one place where a method changes how the backbone is trained.

The :class:`ltdist.engine.trainer.Trainer` owns the DeepSpeed engine, the data stream, checkpoints and
preemption; an objective owns the loss and any state of its own. This module is the contract the trainer
calls; the objectives themselves are methods (:mod:`ltdist.methods.objectives`, chosen by ``method.loss``)
and the train stage hands the trainer a builder of one. Per micro-batch the trainer calls

1. :meth:`TrainingObjective.before_micro_step` (e.g. the MPCL meta step, before the real forward);
2. :meth:`TrainingObjective.loss` on the batch's features, logits and labels (one engine forward);
3. when every rank's loss was finite and the backward ran, :meth:`TrainingObjective.after_micro_step`
   (e.g. the MPCL prototype EMA over the all-gathered batch).

Everything an objective holds is in :meth:`state_dict` and goes into the verified checkpoint, so a
resumed run continues exactly. State must be identical on every rank (it is saved once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ltdist.models import LongTailModel


class TrainingObjective:
    """Base class: plain cross-entropy and no state; subclasses override what they need."""

    name = "ce"

    def loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """Scalar loss of one micro-batch.

        Args:
            features: [B, F] un-normalised backbone features (same forward as ``logits``).
            logits: [B, C] classifier output (float32).
            labels: [B] int64 class ids.
            epoch: the current epoch (0-based), for warm-up schedules.
        """
        return torch.nn.functional.cross_entropy(logits, labels)

    def before_micro_step(self, model: LongTailModel, images: torch.Tensor, labels: torch.Tensor, *, step: int,
                          epoch: int, lr: float) -> None:
        """Work before the real forward of a micro-batch (images [B, C, H, W], labels [B]); default none."""

    def after_micro_step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """State updates from an accepted micro-batch (features [B, F] detached, labels [B]); default none."""

    def metrics(self) -> dict[str, float]:
        """Objective-specific means since the last call (then reset), for metrics.jsonl."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the checkpoint was written by objective {state.get('name')!r}, this run uses "
                             f"method.loss={self.name!r}: use a new output.run_id or the original method.loss")

    def export(self, run_dir: Path) -> None:
        """Rank 0, after training: write what later stages need (default nothing)."""
