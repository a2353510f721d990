"""The ``kt`` stage: prototypes and KT classifiers from the extracted features and the trained head.

Rank 0 reads ``features/<method.kt.prototypes_from>.pt`` (prototypes, eq. 3), ``features/train.pt``
(the dataset's training count per class), the classifier of ``weights/final.pt`` and builds w_h(k),
w_hc(k) for every k in ``method.kt.ks`` (:mod:`ltdist.methods.kt`). Classes of
``data.exclude_from_training`` count 0 for the attention (the backbone never saw them). The result is
``classifiers/kt.pt`` (:class:`ltdist.methods.kt.KTClassifiers` as a dict); other ranks wait for it.
With ``method.kt.select_on_val`` it also chooses τ and the k set on val (:mod:`ltdist.methods.kt_select`)
and writes ``classifiers/kt_val.pt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ltdist.data.classes import excluded_classes
from ltdist.distributed import barrier
from ltdist.fileio import torch_save_atomic
from ltdist.labels import check_label_range
from ltdist.methods.classifier_set import save_classifier_set
from ltdist.methods.kt import KTClassifiers, build_kt_classifiers, class_prototypes
from ltdist.methods.kt_select import select_kt_on_val
from ltdist.rundir import features_path, load_features, model_path
from ltdist.stages import StageContext

log = logging.getLogger(__name__)


def val_split_needs(cfg: DictConfig) -> dict[str, str]:
    """The kt stage's settings that need a val split in the shards, each with the alternative to suggest
    (for :func:`ltdist.data.classes.check_against_data`)."""
    if "kt" in cfg.stages and cfg.method.kt.prototypes_from == "val":
        return {"method.kt.prototypes_from=val": "prototypes_from=train"}
    return {}


def classifiers_path(run_dir: Path) -> Path:
    return run_dir / "classifiers" / "kt.pt"


def load_kt_classifiers(run_dir: Path) -> KTClassifiers:
    path = classifiers_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the kt stage first (stages=[kt,evaluate])")
    return KTClassifiers.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def make_kt_classifiers(head: torch.nn.Module, train: dict, prototype_source: dict, *, ks: list[int],
                        tau: float, exclude: object, few_threshold: int, linear_scale: float,
                        device: torch.device | str = "cpu") -> KTClassifiers:
    """KT classifiers for a trained head, its training counts and prototypes.

    Args:
        head: the model's classifier (``CosineClassifier``: weight, scale; ``LinearClassifier``: weight,
            bias — KT then uses its normalised rows and ``linear_scale`` as s).
        train, prototype_source: feature dicts (see :func:`ltdist.rundir.load_features`).
        device: where the attention runs (CUDA: the Triton kernel); the result is on the CPU.
    """
    weights = head.weight.detach().float().cpu()
    num_classes = weights.shape[0]
    check_label_range(train["labels"], num_classes, "kt: train labels (classes of the trained head)")
    train_counts = torch.bincount(train["labels"], minlength=num_classes)
    excluded = excluded_classes(exclude, train_counts.tolist(), few_threshold)
    backbone_counts = train_counts.clone()
    backbone_counts[excluded] = 0
    prototypes = class_prototypes(prototype_source["features"], prototype_source["labels"], num_classes)
    w_h, w_hc = build_kt_classifiers(prototypes.to(device), weights.to(device), backbone_counts.to(device), ks, tau)
    w_h, w_hc = w_h.cpu(), w_hc.cpu()
    cosine = hasattr(head, "scale")
    bias = None if cosine else head.bias.detach().float().cpu()
    scale = float(head.scale.detach()) if cosine else float(linear_scale)
    kt = KTClassifiers(ks=list(ks), tau=float(tau), scale=scale, classifier_type="cosine" if cosine else "linear",
                       weights=weights, bias=bias, prototypes=prototypes, train_counts=train_counts,
                       backbone_counts=backbone_counts, w_h=w_h, w_hc=w_hc)
    return kt


def _select_on_val(ctx: StageContext, kt: KTClassifiers) -> None:
    """``method.kt.select_on_val``: τ and the k set chosen on val → ``classifiers/kt_val.pt`` (rank 0)."""
    val = load_features(ctx.run_dir, "val") if features_path(ctx.run_dir, "val").is_file() else None
    if val is not None and val["labels"].numel() == 0:
        val = None
    result = select_kt_on_val(kt, val, list(ctx.cfg.method.kt.tau_grid), ctx.dist.device)
    if val is not None and ctx.cfg.method.kt.prototypes_from == "val":
        result.notes.append("the prototypes come from val too: the choice saw the data it is scored on")
    save_classifier_set(ctx.run_dir, result)
    ctx.append_metrics({"stage": "kt", "select_on_val": result.chosen})
    log.info("kt: %s", "; ".join(result.notes))


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if ctx.dist.is_main:
        from ltdist.models import load_exported_model

        weights = model_path(ctx.run_dir)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: the kt stage needs the train stage's model export")
        head = load_exported_model(weights).classifier
        train = load_features(ctx.run_dir, "train")
        if cfg.method.kt.prototypes_from == "val" and not features_path(ctx.run_dir, "val").is_file():
            raise FileNotFoundError(f"method.kt.prototypes_from=val: no val features in {ctx.run_dir / 'features'} "
                                    "(the shards have no val split, or extract did not run); use "
                                    "method.kt.prototypes_from=train or rebuild the shards with data.val_per_class > 0")
        source = train if cfg.method.kt.prototypes_from == "train" else load_features(ctx.run_dir, "val")
        log.info("kt: prototypes and attention for %d classes, k in %s", head.weight.shape[0], list(cfg.method.kt.ks))
        kt = make_kt_classifiers(
            head, train, source, ks=list(cfg.method.kt.ks), tau=cfg.method.kt.tau,
            exclude=cfg.data.exclude_from_training, few_threshold=cfg.evaluate.few_threshold,
            linear_scale=cfg.method.kt.linear_scale, device=ctx.dist.device)
        torch_save_atomic(kt.state_dict(), classifiers_path(ctx.run_dir))
        untrained = (kt.backbone_counts == 0).nonzero().flatten().tolist()
        summary = {"stage": "kt", "ks": kt.ks, "tau": kt.tau, "scale": kt.scale,
                   "prototypes_from": cfg.method.kt.prototypes_from, "untrained_classes": untrained,
                   "prototype_weight_cosine": F.cosine_similarity(kt.prototypes, kt.weights, dim=1).tolist()}
        ctx.append_metrics(summary)
        log.info("kt: %s", json.dumps({k: v for k, v in summary.items() if k != "prototype_weight_cosine"}))
        if cfg.method.kt.select_on_val:
            _select_on_val(ctx, kt)
    barrier()
