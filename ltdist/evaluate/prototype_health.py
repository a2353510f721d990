"""Prototype health of an MPCL run: how well its prototypes c_k and meta-prototypes ĉ_k point at their classes.

For every class k with training features: cos(c_k, μ_k), cos(ĉ_k, μ_k) and ‖ĉ_k − c_k‖ (unit rows), with μ_k
the normalised mean of the class's L2-normalised training features (the space the prototypes live in),
the number of updates c_k received in training, and the test top-1 of nearest-prototype classification
(argmax_k cos(z, c_k), and with ĉ). Groups (many / medium / few) average over their classes with
training features; classes without training features are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ltdist.class_groups import GROUPS, per_class_accuracy

CHUNK = 4096  # test rows scored against all centres at once: bounds the [CHUNK, C] similarities
FIELDS = ("cos_prototype_mean", "cos_meta_mean", "meta_shift", "updates", "nearest_prototype_top1",
          "nearest_meta_top1")


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """μ [C, F]: normalised means of the normalised features [N, F] per class (zero rows for empty classes)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, F.normalize(features.double(), dim=1))
    return F.normalize(sums, dim=1).float()


def nearest_top1(centres: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[C] per-class top-1 of argmax_k cos(z, centre_k) on ``features`` [N, F] (NaN: class not in ``labels``)."""
    unit = F.normalize(centres.float(), dim=1)
    predicted = torch.cat([(F.normalize(part.float(), dim=1) @ unit.T).argmax(1)  # [CHUNK, C] at a time
                           for part in features.split(CHUNK)]) if features.numel() else labels.clone()
    return per_class_accuracy(predicted, labels, centres.shape[0])


def prototype_health(prototypes: torch.Tensor, meta: torch.Tensor | None, updates: torch.Tensor | None,
                     features: torch.Tensor, labels: torch.Tensor, test: dict, groups: dict[str, list[int]],
                     rows_max: int) -> dict:
    """Per-group means and (up to ``rows_max`` classes) per-class rows of :data:`FIELDS`.

    Args:
        prototypes: [C, F] c_k; meta: [C, F] ĉ_k or None (no meta-network); updates: [C] or None (unknown).
        features, labels: the training features [N, F] (un-normalised) and labels [N].
        test: the test feature dict (``features`` [T, F], ``labels`` [T]) for nearest-prototype top-1.
        groups: class ids per group; rows_max: above this many classes only the groups are returned.
    Returns:
        {"groups": {group: {field: value or None}}, "classes": [{"class", "train_count", field: ...}] or
        absent past ``rows_max``}. A field is None where it does not apply (no meta-network).
    """
    num_classes = prototypes.shape[0]
    mu = class_means(features, labels, num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    c = F.normalize(prototypes.float(), dim=1)
    per_class = {"cos_prototype_mean": (c * mu).sum(1),
                 "cos_meta_mean": None if meta is None else (F.normalize(meta.float(), dim=1) * mu).sum(1),
                 "meta_shift": None if meta is None else (F.normalize(meta.float(), dim=1) - c).norm(dim=1),
                 "updates": None if updates is None else updates.double(),
                 "nearest_prototype_top1": nearest_top1(c, test["features"], test["labels"]),
                 "nearest_meta_top1": None if meta is None else nearest_top1(meta, test["features"], test["labels"])}
    present = counts > 0

    def mean_over(ids: Sequence[int], values: torch.Tensor | None) -> float | None:
        keep = [i for i in ids if bool(present[i]) and not bool(torch.isnan(values[i]))] if values is not None else []
        return float(values[keep].double().mean()) if keep else None

    out: dict = {"groups": {g: {f: mean_over(groups[g], v) for f, v in per_class.items()} for g in GROUPS}}
    out["groups"]["all"] = {f: mean_over(range(num_classes), v) for f, v in per_class.items()}
    if num_classes <= rows_max:
        out["classes"] = [{"class": k, "train_count": int(counts[k]),
                           **{f: None if v is None or bool(torch.isnan(v[k])) else float(v[k])
                              for f, v in per_class.items()}}
                          for k in range(num_classes)]
    return out


def health_markdown(health: dict) -> list[str]:
    """report.md's "Prototype health" section of :func:`prototype_health`'s result."""

    def cell(value: float | None, digits: int = 3) -> str:
        return "N/A" if value is None else f"{value:.{digits}f}"

    def percent(value: float | None) -> str:
        return "N/A" if value is None else f"{100 * value:.1f}"

    def row(name: str, values: dict) -> str:
        return (f"| {name} | {cell(values['cos_prototype_mean'])} | {cell(values['cos_meta_mean'])} | "
                f"{cell(values['meta_shift'], 4)} | {cell(values['updates'], 0)} | "
                f"{percent(values['nearest_prototype_top1'])} | {percent(values['nearest_meta_top1'])} |")

    header = ["| Group / class | cos(c, class mean) | cos(ĉ, class mean) | ‖ĉ − c‖ | updates | "
              "nearest c top-1 (%) | nearest ĉ top-1 (%) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines = ["## Prototype health (MPCL)", "",
             "Prototypes c and meta-prototypes ĉ of the MPCL run against the normalised mean of each class's "
             "normalised training features; groups average their classes (updates: mean per class); nearest "
             "top-1: test accuracy of argmax_k cos(z, c_k) (or ĉ_k).", "",
             *header, *(row(g, v) for g, v in health["groups"].items())]
    for entry in health.get("classes", []):
        lines.append(row(f"class {entry['class']} (n = {entry['train_count']})", entry))
    return [*lines, ""]
