"""MPCL's balanced meta set (paper 2, §3.2): a few images per class that the meta-network learns from.

``method.mpcl.meta_source`` says where it comes from:

- ``val``: up to ``meta_per_class`` images per class of the val split;
- ``train``: up to ``meta_per_class`` images per class carved from the train split, at most half of a
  class's images (a tail class keeps the rest for training). Those images are
  then removed from the training stream (``build_train_stream(exclude_keys=...)``), so the CE loss never
  sees them, and the per-class counts the sampler uses drop by what was carved.

Never from test. The choice is deterministic from (split contents, seed): every rank carves the same set
without communicating. A class with fewer images gives what it has (a warning lists them). The images
stay encoded in memory (a few per class) and are decoded with the eval transform per meta batch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ltdist.data.index import LongTailIndex
from ltdist.data.tario import read_shard
from ltdist.data.transforms import EvalTransform, to_normalized_tensor

log = logging.getLogger(__name__)

META_SOURCES = ("val", "train")


@dataclass
class MetaSet:
    """The meta set: ``keys``, ``labels`` and encoded ``images``, aligned, sorted by key."""

    source: str
    keys: list[str]
    labels: list[int]
    images: list[bytes]
    num_classes: int

    def counts(self) -> list[int]:
        """[C] images per class."""
        counts = Counter(self.labels)
        return [counts.get(c, 0) for c in range(self.num_classes)]

    def held_out_of_training(self) -> dict[str, int]:
        """Training samples (key → label) the training stream must skip: the set's images when it was carved
        from train, none when it comes from val."""
        return dict(zip(self.keys, self.labels)) if self.source == "train" else {}

    def batch(self, size: int, *, seed: int, step: int, rank: int, image_size: int,
              channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A meta batch (images float [size, C, H, W] normalised, labels int64 [size]) drawn uniformly with
        replacement from the (balanced) set; deterministic from (seed, step, rank), so a resumed run draws
        the same batches."""
        rng = random.Random(f"meta/{seed}/{step}/{rank}")
        picks = [rng.randrange(len(self.keys)) for _ in range(size)]
        transform = EvalTransform(image_size, channels)
        images = np.stack([transform(self.images[i]) for i in picks])
        return to_normalized_tensor(images, channels), torch.tensor([self.labels[i] for i in picks], dtype=torch.long)


def carve_meta_set(index: LongTailIndex, source: str, per_class: int, seed: int) -> MetaSet:
    """Choose up to ``per_class`` images of each class from split ``source`` (see the module docstring)."""
    if source not in META_SOURCES:
        raise ValueError(f"method.mpcl.meta_source must be one of {META_SOURCES}, got {source!r}")
    if source not in index.counts:
        raise ValueError(f"method.mpcl.meta_source={source}: {index.root} has no {source} split; "
                         f"use method.mpcl.meta_source=train")
    if per_class < 1:
        raise ValueError(f"method.mpcl.meta_per_class must be >= 1, got {per_class}")
    by_class: dict[int, list[tuple[str, bytes]]] = defaultdict(list)
    skips: Counter = Counter()
    for shard in index.split_shards(source):
        for sample in read_shard(index.root / shard.file, shard.samples, index.num_classes, skips,
                                 labels=index.label_spec):
            by_class[sample.label].append((sample.key, sample.image))
    chosen: list[tuple[str, int, bytes]] = []
    short = []
    for label in range(index.num_classes):
        members = sorted(by_class.get(label, []))
        rng = random.Random(f"meta-set/{seed}/{label}")
        # From train, a class keeps at least half of its images for training.
        limit = min(per_class, len(members) if source == "val" else len(members) // 2)
        picked = rng.sample(members, limit)
        if len(picked) < per_class:
            short.append((label, len(picked)))
        chosen += [(key, label, image) for key, image in picked]
    if short:
        log.warning("meta set from %s: %d classes have fewer than %d images (class: images): %s", source,
                    len(short), per_class, ", ".join(f"{c}: {n}" for c, n in short[:20]))
    if not chosen:
        raise ValueError(f"method.mpcl.meta_source={source}: the split holds no readable image")
    chosen.sort()
    return MetaSet(source, [k for k, _, _ in chosen], [c for _, c, _ in chosen], [i for _, _, i in chosen],
                   index.num_classes)
