"""One logical loader worker of the training stream: its shards -> resampler -> shuffle buffer ->
decode + augment -> batches, deterministic from (seed, epoch, rank, worker).

Samples stay undecoded (bytes) until they leave the shuffle buffer. That is what makes exact
mid-epoch resumption cheap: resuming at buffer position ``pos`` replays reading, resampling and
buffering (no decoding) and then continues with the same per-position augmentation seeds.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ltdist.data.plan import StreamPlan
from ltdist.data.sampling import draw_repeats
from ltdist.data.tario import CORRUPT_IMAGE, RawSample, read_shard
from ltdist.data.transforms import TrainTransform, to_normalized_tensor

Payload = dict  # what a worker sends to the main process for one batch (see WorkerStream.batches)


class WorkerStream:
    """The batches of logical worker ``worker`` of ``plan.rank`` in ``epoch``.

    ``start_pos`` / ``start_batch``: samples already taken from the shuffle buffer and batches already
    delivered by this worker (resumption); ``decode_skips`` the corrupt-image counts up to there
    (those happen after the buffer, so replaying the prefix without decoding does not recount them).
    """

    def __init__(self, plan: StreamPlan, epoch: int, worker: int, start_pos: int = 0, start_batch: int = 0,
                 decode_skips: Counter | None = None, decode: bool = True):
        self.plan, self.epoch, self.worker, self.decode = plan, epoch, worker, decode
        self.start_pos, self.start_batch = start_pos, start_batch
        self.skips: Counter = Counter()  # (shard file, reason) -> count, cumulative over the epoch
        self.skips.update(decode_skips or {})
        self._reasons: Counter = Counter()  # reason -> count of what the reader skipped
        self.read = 0  # samples accounted by the reader (valid + skipped before the buffer)
        self.tag = f"{plan.seed}/{epoch}/{plan.rank}/{worker}"
        # Augmentation seed of the sample at buffer position pos: aug_base + pos (int seeding is cheap).
        self.aug_base = int.from_bytes(hashlib.sha256(f"aug/{self.tag}".encode()).digest()[:8], "big") << 32
        self.transform = TrainTransform(plan.image_size, plan.channels)

    def _read_pass(self, pass_: int) -> Iterator[RawSample]:
        """One pass over this worker's pieces of shards (passes after the first in a fresh seeded order)."""
        order = self.plan.slot_shards(self.epoch, self.worker)
        if pass_:
            random.Random(f"pass/{self.tag}/{pass_}").shuffle(order)
        valid = 0
        for i in order:
            before = self._reasons.total()
            path = Path(self.plan.shard_paths[i])
            start, stop = self.plan.shard_ranges[i]
            for sample in read_shard(path, self.plan.shard_samples[i], self.plan.num_classes, self._reasons,
                                     self.skips, start, stop, self.plan.labels):
                self.read += 1
                if sample.key in self.plan.exclude_keys:
                    continue
                valid += 1
                yield sample
            self.read += self._reasons.total() - before
        if valid == 0:
            names = ", ".join(self.plan.shard_paths[i] for i in order)
            raise RuntimeError(f"rank {self.plan.rank} worker {self.worker}: no readable sample in {names}")

    def _shuffled(self) -> Iterator[RawSample]:
        """Passes over the shards, each resampled (repeat factors), shuffled through the buffer and
        drained at its end, so a pass is emitted whole and the epoch cut only trims the last pass.
        One rng and no decoding: replayable."""
        rng = random.Random(f"stream/{self.tag}")
        size = max(1, self.plan.shuffle_buffer)
        for pass_ in itertools.count():
            buffer: list[RawSample] = []
            emitted = 0
            for sample in self._read_pass(pass_):
                for _ in range(draw_repeats(self.plan.factors[sample.label], rng)):
                    if len(buffer) < size:
                        buffer.append(sample)
                        continue
                    i = rng.randrange(size)
                    emitted += 1
                    yield buffer[i]
                    buffer[i] = sample
            if emitted + len(buffer) == 0:
                raise RuntimeError(f"rank {self.plan.rank} worker {self.worker}: its shards hold only samples "
                                   "of excluded classes")
            rng.shuffle(buffer)
            yield from buffer

    def batches(self) -> Iterator[Payload]:
        """Yield this worker's remaining batches as payload dicts: ``images`` float [B, C, H, W]
        (normalised; None without decoding), ``labels`` int64 [B], ``keys``, and the position
        ``pos`` (samples taken from the buffer; each one decode attempt) plus cumulative skip counts."""
        quota, _ = self.plan.worker_batches(self.worker)
        stream = self._shuffled()
        for _ in range(self.start_pos):
            next(stream)
        pos, b = self.start_pos, self.plan.batch_size
        for _ in range(self.start_batch, quota):
            images, labels, keys = [], [], []
            while len(labels) < b:
                sample = next(stream)
                pos += 1
                if self.decode:
                    try:
                        images.append(self.transform(sample.image, random.Random(self.aug_base + pos)))
                    except Exception:  # any decoder failure is a corrupt image; the stream must go on
                        self.skips[(sample.shard, CORRUPT_IMAGE)] += 1
                        continue
                labels.append(sample.label)
                keys.append(sample.key)
            yield {
                "images": to_normalized_tensor(np.stack(images), self.plan.channels) if images else None,
                "labels": torch.tensor(labels, dtype=torch.long), "keys": keys, "worker": self.worker,
                "pos": pos, "read": self.read,
                "skips": [[shard, reason, n] for (shard, reason), n in sorted(self.skips.items())],
            }
