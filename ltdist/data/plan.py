"""The static plan of a training stream: which shards a (rank, worker) slot reads in an epoch and
how many batches it owes. Every rank computes the same plan from index.json alone, which is what
makes the batch count identical on every rank without any communication.

The plan deals *pieces* to slots: a piece is a shard, or a sample range of one. When the train
shards that hold trained classes are fewer than ranks × workers (a small data set, or shards written
for fewer slots), each of them is read as several contiguous sample ranges, so every slot has
something to read. Each sample still belongs to exactly one piece, so every pass reads every sample
once and the exact-frequency and resume guarantees are those of whole shards.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ltdist.data.index import LongTailIndex
from ltdist.data.sampling import repeat_factors, warn_empty_classes
from ltdist.data.tario import LabelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPlan:
    """Everything a loader worker needs (picklable, no open files)."""

    # Per piece (a shard or a sample range of one; a split shard's path appears once per piece):
    shard_paths: tuple[str, ...]
    shard_samples: tuple[int, ...]  # the whole shard's manifest count (what the reader checks it against)
    shard_ranges: tuple[tuple[int, int], ...]  # [start, stop) sample ordinals of the shard this piece reads
    shard_emissions: tuple[float, ...]  # expected emitted samples per pass: Σ_j n_{piece,j} · r_j
    num_classes: int
    factors: tuple[float, ...]  # per-class repeat factor r_j
    batch_size: int
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1; DataLoader processes when > 1 requested)
    seed: int
    image_size: int
    channels: int
    shuffle_buffer: int
    batches_per_epoch: int
    samples_per_epoch: int  # N: expected emissions per epoch over all ranks (= Σ active n_j)
    exclude_keys: frozenset[str] = frozenset()  # sample keys held out of training (MPCL's meta set)
    labels: LabelSpec = field(default_factory=LabelSpec)  # where the label is (LongTailIndex.label_spec)

    @property
    def slots(self) -> int:
        return self.world_size * self.num_workers

    def slot_shards(self, epoch: int, worker: int) -> list[int]:
        """Piece ids of (self.rank, worker) in epoch ``epoch``, in reading order.

        Pieces are dealt largest expected emission first to the least-loaded slot (ties broken by a
        seeded per-epoch shuffle) and read in that shuffled order. Balancing expected *emissions*, not
        samples, matters: a slot holding tail samples with large repeat factors would otherwise be
        truncated more often than the others and under-emit exactly those classes.
        """
        order = list(range(len(self.shard_paths)))
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        rank_in_order = {shard: k for k, shard in enumerate(order)}
        heap = [(0.0, slot) for slot in range(self.slots)]  # (load, slot): least loaded, lowest id first
        owned: list[list[int]] = [[] for _ in range(self.slots)]
        for i in sorted(order, key=lambda s: -self.shard_emissions[s]):
            load, slot = heapq.heappop(heap)
            owned[slot].append(i)
            heapq.heappush(heap, (load + self.shard_emissions[i], slot))
        return sorted(owned[self.rank * self.num_workers + worker], key=rank_in_order.__getitem__)

    def worker_batches(self, worker: int, start_batch: int = 0) -> tuple[int, int]:
        """(batches worker owes this epoch, of which already done when the rank has done ``start_batch``):
        batch t of a rank comes from worker t % num_workers."""
        return (len(range(worker, self.batches_per_epoch, self.num_workers)),
                len(range(worker, start_batch, self.num_workers)))


def make_plan(
    index: LongTailIndex, *, batch_size: int, rank: int, world_size: int, num_workers: int, sampling_power: float,
    seed: int, image_size: int, channels: int, shuffle_buffer: int, exclude_classes: Sequence[int] = (),
    exclude_keys: Mapping[str, int] | None = None,
) -> StreamPlan:
    """Validate the request against the index and build the plan (clear errors for what cannot work).

    ``exclude_keys``: sample key → label of train samples never to emit; the class counts n_j that the
    repeat factors use drop by what is excluded."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"bad stream geometry: batch_size={batch_size} rank={rank} world_size={world_size} "
                         f"num_workers={num_workers}")
    bad = [c for c in exclude_classes if not 0 <= c < index.num_classes]
    if bad:
        raise ValueError(f"exclude_classes {bad} out of range [0, {index.num_classes})")
    shards = index.split_shards("train")
    missing = index.missing_files("train")
    if missing:
        raise FileNotFoundError(f"{len(missing)} train shards missing: " + ", ".join(str(p) for p in missing))
    resized = index.resized_files("train")
    if resized:
        log.warning("train shards whose size differs from the manifest (damaged samples will be skipped and "
                    "counted): %s", ", ".join(str(p) for p in resized))
    workers = max(1, num_workers)
    exclude_keys = dict(exclude_keys or {})
    held_out = Counter(exclude_keys.values())
    counts = [n - held_out.get(j, 0) for j, n in enumerate(index.train_counts)]
    if any(n < 0 for n in counts):
        raise ValueError("exclude_keys holds more samples of a class than the train split has")
    warn_empty_classes(counts, index.classes)
    factors = repeat_factors(counts, sampling_power, exclude_classes)
    total = sum(n for n, r in zip(counts, factors) if r > 0)
    per_rank = total // (world_size * batch_size)
    if per_rank < 1:
        raise ValueError(f"{total} training samples cannot fill one batch of {batch_size} on each of "
                         f"{world_size} ranks")
    emissions = [sum(n * factors[int(j)] for j, n in s.class_counts.items()) for s in shards]
    pieces = split_into_pieces([s.samples for s in shards], emissions, world_size * workers)
    if len(pieces) > len(shards):
        log.info("%d train shards hold trained classes for ranks × workers = %d × %d: each is read as up to %d "
                 "sample ranges", sum(e > 0 for e in emissions), world_size, workers,
                 max(Counter(i for i, _, _ in pieces).values()))
    return StreamPlan(
        shard_paths=tuple(str(Path(index.root) / shards[i].file) for i, _, _ in pieces),
        shard_samples=tuple(shards[i].samples for i, _, _ in pieces),
        shard_ranges=tuple((a, b) for _, a, b in pieces),
        shard_emissions=tuple(emissions[i] * (b - a) / shards[i].samples for i, a, b in pieces),
        num_classes=index.num_classes,
        factors=tuple(float(r) for r in factors), batch_size=batch_size, rank=rank, world_size=world_size,
        num_workers=workers, seed=seed, image_size=image_size, channels=channels, shuffle_buffer=shuffle_buffer,
        batches_per_epoch=per_rank, samples_per_epoch=total, exclude_keys=frozenset(exclude_keys),
        labels=index.label_spec,
    )


def split_into_pieces(samples: Sequence[int], emissions: Sequence[float], slots: int) -> list[tuple[int, int, int]]:
    """(shard id, start, stop) pieces covering every sample of every shard once, at least ``slots`` of
    them with expected emissions > 0.

    With fewer such shards (they hold trained classes) than ``slots``, each of them is cut into
    min(k, its samples) near-equal contiguous sample ranges, k the smallest count giving ``slots``
    pieces; the other shards stay whole. Raises ValueError when even one sample per piece cannot give
    every slot a piece.
    """
    useful = [samples[i] for i, e in enumerate(emissions) if e > 0]
    k = 1
    while sum(min(k, n) for n in useful) < slots and k < max(useful, default=0):
        k += 1
    pieces = []
    for i, n in enumerate(samples):
        parts = min(k, n) if emissions[i] > 0 else 1
        bounds = [round(n * p / parts) for p in range(parts + 1)]
        pieces += [(i, a, b) for a, b in itertools.pairwise(bounds)]
    got = sum(emissions[i] > 0 for i, _, _ in pieces)
    if got < slots:
        raise ValueError(f"the train shards hold {got} samples of the trained classes, fewer than ranks × workers = "
                         f"{slots}: every loader slot needs one; use fewer ranks or data.num_workers")
    return pieces
