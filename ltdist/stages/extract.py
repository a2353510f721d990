"""The ``extract`` stage: the trained backbone's features for every split, saved in the run directory.

Every rank embeds its share of each split (``ltdist.data.iterate_split`` gives each sample to exactly
one rank) and writes ``features/<split>.rank<r>.pt``; after a barrier rank 0 merges the shards into
``features/<split>.pt`` — a dict with ``features`` [N, F] float32 (un-normalised backbone output),
``labels`` [N] int64 and ``keys`` list[str], sorted by key so the file does not depend on the number
of ranks — and removes the rank files. A split whose merged file is newer than the model export is
skipped, so a requeued job does not redo finished splits.

Frozen backbone: with ``model.weights`` (or ``model.pretrained``) and no ``train`` stage, the backbone comes
from those weights and the export is made here: its head is imprinted with the class prototypes of the
train features (eq. 3's normalised class means; a class without train samples keeps its random row), so
``kt`` (which attends over the head's rows), ``evaluate``'s head row and every stage-2 method work on any
pretrained feature extractor. The export is written after the train features are merged and before they
are saved, so every features file is newer than it.
"""

from __future__ import annotations

import logging

import torch

from ltdist.distributed import barrier
from ltdist.fileio import torch_save_atomic
from ltdist.heartbeat import Heartbeat
from ltdist.rundir import features_path, model_path
from ltdist.stages import StageContext
from ltdist.watchdog import watchdog

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def merge_feature_shards(shards: list[dict]) -> dict:
    """One split's per-rank shards → one dict sorted by sample key; duplicate keys are an error."""
    keys = [k for s in shards for k in s["keys"]]
    if len(set(keys)) != len(keys):
        raise ValueError("extract: a sample key appears on more than one rank; the split was not partitioned")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    features = torch.cat([s["features"] for s in shards]) if shards else torch.empty(0, 0)
    labels = torch.cat([s["labels"] for s in shards]) if shards else torch.empty(0, dtype=torch.long)
    return {"features": features[index].float(), "labels": labels[index].long(), "keys": [keys[i] for i in order]}


@torch.no_grad()
def embed_split(model: torch.nn.Module, batches, device: torch.device, capacity: int,
                heartbeat: Heartbeat | None = None) -> dict:
    """Features of every batch this rank receives: ``{"features" [N, F], "labels" [N], "keys"}`` on CPU.

    ``capacity`` is the most samples the batches can hold (the rank's shards' sample count; skipped samples
    make N smaller). The results are written into tensors of that size allocated up front: a small tensor
    kept per batch between the forward passes' large activations fragmented the heap, and peak memory
    grew with the split (1.8 GiB for 243 k features of 64 floats). ``heartbeat`` (optional) is ticked with
    the number of samples embedded so far.
    """
    features = torch.empty(capacity, model.feature_dim)
    labels = torch.empty(capacity, dtype=torch.long)
    keys: list[str] = []
    for batch in batches:
        start, end = len(keys), len(keys) + len(batch.keys)
        if end > capacity:
            raise ValueError(f"extract: more than the expected {capacity} samples in this rank's shards")
        features[start:end] = model.forward_features(batch.images.to(device, non_blocking=True)).float().cpu()
        labels[start:end] = batch.labels.long().cpu()
        keys.extend(batch.keys)
        if heartbeat is not None:
            heartbeat.tick(len(keys), "images")
    n = len(keys)
    if n < capacity:  # a view would keep (and torch.save would write) the whole preallocated storage
        features, labels = features[:n].clone(), labels[:n].clone()
    return {"features": features, "labels": labels, "keys": keys}


def frozen_backbone(cfg) -> bool:
    """Whether extract embeds with ``model.weights`` / ``model.pretrained`` itself (no train stage)."""
    return "train" not in cfg.stages and bool(cfg.model.weights or cfg.model.pretrained)


@torch.no_grad()
def imprint_head(head: torch.nn.Module, train: dict) -> None:
    """Set the rows of a new head to the class prototypes of ``train`` features (in place); a linear head's
    bias to 0. Classes without train samples keep their rows."""
    from ltdist.methods.kt import class_prototypes

    num_classes = head.weight.shape[0]
    prototypes = class_prototypes(train["features"], train["labels"], num_classes).to(head.weight)
    seen = torch.bincount(train["labels"], minlength=num_classes) > 0
    head.weight[seen] = prototypes[seen]
    if getattr(head, "bias", None) is not None:
        head.bias.zero_()


def run(ctx: StageContext) -> None:
    from ltdist.data import ensure_shards, iterate_split, read_index
    from ltdist.models import export_model, load_exported_model
    from ltdist.models.weights import build_configured_model, write_weights_record

    cfg, env = ctx.cfg, ctx.dist
    weights = model_path(ctx.run_dir)
    frozen = frozen_backbone(cfg) and not weights.is_file()
    if not weights.is_file() and not frozen:
        raise FileNotFoundError(f"{weights} is missing: the extract stage needs the train stage's model export "
                                "(or model.weights=PATH to embed with a pretrained backbone)")
    with watchdog(f"rank {env.rank}: the shard index in {cfg.data.shards} (another process may be building it)"):
        index = read_index(ensure_shards(cfg.data))
    if frozen:
        torch.manual_seed(cfg.trainer.seed)  # the head's rows of classes without train samples
        model, source = build_configured_model(cfg.model, index.num_classes, cfg.data.channels)
        model = model.to(env.device).eval()
    else:
        model = load_exported_model(weights).to(env.device).eval()
    for split in SPLITS:
        if split not in index.manifest:
            log.warning("extract: the shards have no %s split, skipped", split)
            continue
        merged = features_path(ctx.run_dir, split)
        if weights.is_file() and merged.is_file() and merged.stat().st_mtime >= weights.stat().st_mtime:
            log.info("extract: %s is up to date, skipped", merged)
            continue
        # trainer.batch_size is global: each rank embeds its share of it per forward pass
        batches = iterate_split(index, split, batch_size=max(1, cfg.trainer.batch_size // env.world_size),
                                rank=env.rank,
                                world_size=env.world_size, image_size=cfg.data.image_size,
                                channels=cfg.data.channels, num_workers=cfg.data.num_workers)
        # This rank's shards, as iterate_split deals them; rank 0's heartbeat speaks for all (every share is
        # within one shard of the others).
        mine = sum(s.samples for s in index.split_shards(split)[env.rank::env.world_size])
        heartbeat = Heartbeat(f"extract {split} (rank 0)", mine, enabled=env.is_main)
        shard = embed_split(model, batches, env.device, mine, heartbeat)
        shard_path = merged.with_name(f"{split}.rank{env.rank}.pt")
        torch_save_atomic(shard, shard_path)
        barrier()
        if env.is_main:
            paths = [merged.with_name(f"{split}.rank{r}.pt") for r in range(env.world_size)]
            result = merge_feature_shards([torch.load(p, weights_only=True) for p in paths])
            if frozen and split == "train":
                imprint_head(model.classifier, result)
                export_model(model, weights)
                if source is not None:
                    write_weights_record(weights.parent, source)
                log.info("extract: frozen backbone from %s; head imprinted with the train prototypes: %s",
                         source, weights)
            torch_save_atomic(result, merged)
            for p in paths:
                p.unlink()
            log.info("extract: %s: %d samples, %d features each", split, len(result["keys"]),
                     result["features"].shape[1])
        barrier()
