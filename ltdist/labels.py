"""The range check of class-id labels, for every op that indexes by label (a bincount, a scatter, a Triton
kernel that would read out of bounds)."""

from __future__ import annotations

import torch


def check_label_range(labels: torch.Tensor, num_classes: int, what: str = "labels") -> None:
    """Raise ``ValueError("<what> must lie in [0, C), got range [min, max]")`` unless every entry of
    ``labels`` (class ids, any shape; empty passes) lies in [0, ``num_classes``). ``what`` names the op and
    the tensor, e.g. ``"prototype_ema: labels"``."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
