"""Deterministic, non-augmented iteration over a split (validation, feature extraction, fault scans).

Shard i of a split belongs to rank i % world_size and, within the rank, to loader worker
(i // world_size) % num_workers, so every sample is read exactly once across all ranks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ltdist.data.index import LongTailIndex, read_index
from ltdist.data.stream import Batch
from ltdist.data.tario import CORRUPT_IMAGE, read_shard
from ltdist.data.transforms import EvalTransform, to_normalized_tensor

log = logging.getLogger(__name__)


class _SplitDataset(IterableDataset):
    def __init__(self, index: LongTailIndex, split: str, shard_ids: list[int], batch_size: int,
                 image_size: int, channels: int, workers: int):
        self.index, self.split, self.shard_ids, self.batch_size = index, split, shard_ids, batch_size
        self.transform, self.workers, self.channels = EvalTransform(image_size, channels), workers, channels
        self.skips: Counter = Counter()  # reason -> count (this process's share)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shards = self.index.split_shards(self.split)
        images, labels, keys = [], [], []
        for i in self.shard_ids[worker::self.workers]:
            for s in read_shard(self.index.root / shards[i].file, shards[i].samples, self.index.num_classes,
                                self.skips, labels=self.index.label_spec):
                try:
                    images.append(self.transform(s.image))
                except Exception:  # undecodable bytes: counted, never fatal
                    self.skips[CORRUPT_IMAGE] += 1
                    continue
                labels.append(s.label)
                keys.append(s.key)
                if len(labels) == self.batch_size:
                    yield to_normalized_tensor(np.stack(images), self.channels), labels, keys
                    images, labels, keys = [], [], []
        if labels:
            yield to_normalized_tensor(np.stack(images), self.channels), labels, keys
        if self.skips:  # logged where it happened: DataLoader workers do not share this counter
            log.warning("%s worker %d: skipped samples by reason: %s", self.split, worker, dict(self.skips))


def iterate_split(
    index: LongTailIndex | Path, split: str, *, batch_size: int, rank: int, world_size: int, image_size: int,
    channels: int, num_workers: int = 0,
) -> Iterator[Batch]:
    """Batches (eval transforms, normalised float [B, C, H, W]) of this rank's disjoint share of
    ``split``, in a deterministic order; the last batch of each worker may be short."""
    if not isinstance(index, LongTailIndex):
        index = read_index(index)
    missing = index.missing_files(split)
    if missing:
        raise FileNotFoundError(f"{split} shards missing: " + ", ".join(map(str, missing)))
    mine = list(range(rank, len(index.split_shards(split)), world_size))
    dataset = _SplitDataset(index, split, mine, batch_size, image_size, channels, max(1, num_workers))
    source = DataLoader(dataset, batch_size=None, num_workers=num_workers) if num_workers > 0 else dataset
    for images, labels, keys in source:
        yield Batch(images, torch.as_tensor(labels, dtype=torch.long), list(keys))


def scan_split(index: LongTailIndex | Path, split: str, channels: int = 3) -> tuple[Counter, Counter]:
    """Read and decode every sample of ``split`` once. Returns (valid samples per class label,
    skipped samples per reason); with the manifest the losses are exact."""
    if not isinstance(index, LongTailIndex):
        index = read_index(index)
    dataset = _SplitDataset(index, split, list(range(len(index.split_shards(split)))), 256, 8, channels, 1)
    valid: Counter = Counter()
    for _, labels, _ in dataset:
        valid.update(labels)
    return valid, dataset.skips
