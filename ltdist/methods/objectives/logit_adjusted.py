"""Cross-entropy on logits shifted by a per-class offset: plain CE, balanced softmax, logit-adjusted loss.

All three are softmax cross-entropy of ``logits + offset`` with a fixed offset [C]:

- ``ce``: offset 0;
- ``balanced_softmax`` ("Balanced Meta-Softmax for Long-Tailed Visual Recognition", Ren et al., NeurIPS
  2020, arXiv:2007.10740): offset log n_j, the log training count;
- ``logit_adjusted`` ("Long-tail learning via logit adjustment", Menon et al., ICLR 2021, arXiv:2007.07314,
  eq. 10): offset τ · log π_j with π_j = n_j / N the training class prior.

Balanced softmax is logit adjustment with τ = 1 (log π_j and log n_j differ by log N, the same for every
class, which softmax ignores). The offset applies to the loss only: the model's own logits are what
prediction uses, which is the point of both methods. Classes with n_j = 0 get an offset of log(1e-12)
relative to the others — they are never a training target, so only their logits are pushed down less.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ltdist.engine.objective import TrainingObjective


def log_prior(train_counts: Sequence[int]) -> torch.Tensor:
    """log π_j = log(n_j / N) as float32 [C]; an empty class counts as 1e-12 of N (finite, very negative)."""
    counts = torch.as_tensor(list(train_counts), dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError("log_prior: every class has zero training samples")
    prior = counts / counts.sum()
    return prior.clamp(min=1e-12).log().float()


class LogitOffsetCrossEntropy(TrainingObjective):
    """softmax cross-entropy of ``logits + offset``; ``offset`` [C] float32 (None: plain CE)."""

    def __init__(self, name: str, offset: torch.Tensor | None = None):
        self.name = name
        self.offset = offset

    def loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.offset is not None:
            logits = logits + self.offset.to(logits.device, logits.dtype)
        return F.cross_entropy(logits, labels)


def cross_entropy() -> LogitOffsetCrossEntropy:
    return LogitOffsetCrossEntropy("ce")


def balanced_softmax(train_counts: Sequence[int]) -> LogitOffsetCrossEntropy:
    """Loss on logits + log n_j (equal to :func:`logit_adjusted` with τ = 1)."""
    return LogitOffsetCrossEntropy("balanced_softmax", log_prior(train_counts))


def logit_adjusted(train_counts: Sequence[int], tau: float) -> LogitOffsetCrossEntropy:
    """Loss on logits + τ · log π_j."""
    return LogitOffsetCrossEntropy("logit_adjusted", tau * log_prior(train_counts))
