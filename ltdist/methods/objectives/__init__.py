"""Stage-1 training objectives, chosen by ``method.loss`` (the contract: :mod:`ltdist.engine.objective`).

| ``method.loss`` | what the backbone is trained with |
|---|---|
| ``ce`` | softmax cross-entropy (with the cosine or the linear head of ``model.classifier``) |
| ``balanced_softmax`` | cross-entropy of logits + log n_j |
| ``logit_adjusted`` | cross-entropy of logits + τ·log π_j (τ = ``method.logit_adjusted.tau``) |
| ``mpcl`` | CE + λ·prototype contrastive loss with (meta-)prototypes (paper 2) |
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from ltdist.data.meta_set import MetaSet, carve_meta_set
from ltdist.engine.objective import TrainingObjective
from ltdist.methods.objectives.logit_adjusted import balanced_softmax, cross_entropy, logit_adjusted
from ltdist.methods.objectives.mpcl import MPCLObjective

log = logging.getLogger(__name__)

OBJECTIVES = ("ce", "balanced_softmax", "logit_adjusted", "mpcl")
META_SET_FILE = "meta_set.json"

__all__ = ["META_SET_FILE", "OBJECTIVES", "TrainingObjective", "build_meta_set", "build_objective"]


def build_meta_set(cfg: DictConfig, index, run_dir: Path, is_main: bool) -> MetaSet | None:
    """MPCL's meta set when the config asks for one (``method.loss=mpcl`` with a meta-network), else None.

    Every rank carves the same set; rank 0 writes its keys, labels and per-class counts to
    ``<run_dir>/meta_set.json``.
    """
    mpcl = cfg.method.mpcl
    if cfg.method.loss != "mpcl" or not mpcl.meta_network:
        return None
    meta_set = carve_meta_set(index, mpcl.meta_source, mpcl.meta_per_class, cfg.trainer.seed)
    if is_main:
        counts = meta_set.counts()
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / META_SET_FILE).write_text(json.dumps(
            {"source": meta_set.source, "per_class": counts, "keys": meta_set.keys, "labels": meta_set.labels},
            indent=1) + "\n")
        log.info("meta set: %d images from %s (per class: min %d, max %d)%s", len(meta_set.keys), meta_set.source,
                 min(counts), max(counts), "; removed from the training stream" if meta_set.source == "train" else "")
    return meta_set


def build_objective(cfg: DictConfig, *, num_classes: int, feature_dim: int, train_counts: Sequence[int],
                    meta_set: MetaSet | None, rank: int, device: torch.device, dtype: torch.dtype) -> TrainingObjective:
    """The objective ``method.loss`` names (the config is validated before: unknown names never get here)."""
    loss = cfg.method.loss
    if loss == "ce":
        return cross_entropy()
    if loss == "balanced_softmax":
        return balanced_softmax(train_counts)
    if loss == "logit_adjusted":
        return logit_adjusted(train_counts, cfg.method.logit_adjusted.tau)
    if loss == "mpcl":
        m = cfg.method.mpcl
        return MPCLObjective(num_classes=num_classes, feature_dim=feature_dim, lam=m.lam, tau=m.tau,
                             momentum=m.momentum, warmup_epochs=m.warmup_epochs, meta_network=m.meta_network,
                             meta_inner=m.meta_inner, meta_optimizer=m.meta_optimizer, meta_lr=m.meta_lr,
                             meta_hidden=m.meta_hidden, meta_init_std=m.meta_init_std,
                             meta_interval=m.meta_interval, meta_set=meta_set, meta_batch_size=m.meta_batch_size,
                             seed=cfg.trainer.seed, rank=rank, image_size=cfg.data.image_size,
                             channels=cfg.data.channels, device=device, dtype=dtype)
    raise ValueError(f"method.loss must be one of {OBJECTIVES}, got {loss!r}")
