"""Class groups by training count and top-1 accuracy per class and per group.

Groups follow the reference long-tail evaluation code: many-shot n > ``many_threshold``, few-shot
n < ``few_threshold``, medium-shot otherwise (both bounds inclusive). Group accuracy is the mean of the
per-class accuracies of the group's classes, as that code computes it; "all" is the top-1 over every
test sample (equal to the per-class mean on a balanced test set).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ltdist.labels import check_label_range

GROUPS = ("many", "medium", "few")


def class_groups(train_counts: Sequence[int] | torch.Tensor, many_threshold: int = 100,
                 few_threshold: int = 20) -> dict[str, list[int]]:
    """Class ids of each group, from the per-class training counts n_i.

    Args:
        train_counts: [C] training samples per class (the dataset's counts).
        many_threshold: many-shot is n > many_threshold.
        few_threshold: few-shot is n < few_threshold; medium is few_threshold ≤ n ≤ many_threshold.
    Returns:
        {"many": [...], "medium": [...], "few": [...]} with sorted class ids; every class in exactly one.
    """
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold ({few_threshold}) must be ≤ many_threshold ({many_threshold})")
    counts = [int(n) for n in train_counts]
    if any(n < 0 for n in counts):
        raise ValueError(f"train_counts must be non-negative, got {counts}")
    groups: dict[str, list[int]] = {name: [] for name in GROUPS}
    for class_id, n in enumerate(counts):
        name = "many" if n > many_threshold else "few" if n < few_threshold else "medium"
        groups[name].append(class_id)
    return groups


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-1 accuracy of each class, in [0, 1]; NaN for a class with no test sample.

    Args:
        predictions: [N] predicted class ids.
        labels: [N] true class ids in [0, num_classes).
    Returns:
        [num_classes] float64.
    """
    if predictions.shape != labels.shape or labels.dim() != 1:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must be "
                         f"equal-length 1-D tensors")
    check_label_range(labels, num_classes)
    labels = labels.long()
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[predictions.long() == labels], minlength=num_classes).double()
    return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan")))


def group_accuracy(predictions: torch.Tensor, labels: torch.Tensor, groups: dict[str, list[int]],
                   num_classes: int) -> dict[str, float | None]:
    """{"many", "medium", "few", "all"} top-1 in [0, 1]; None for a group with no tested class."""
    per_class = per_class_accuracy(predictions, labels, num_classes)
    result: dict[str, float | None] = {}
    for name in GROUPS:
        values = per_class[groups[name]] if groups[name] else per_class.new_empty(0)
        values = values[~values.isnan()]
        result[name] = float(values.mean()) if values.numel() else None
    result["all"] = float((predictions.long() == labels.long()).double().mean()) if labels.numel() else None
    return result
