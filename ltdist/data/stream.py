"""The training stream for the DeepSpeed engine: exact rebalancing, equal batches on every rank,
exact mid-epoch resumption (README.md, "How it works: Sampling in a stream").

Batch t of a rank's epoch comes from logical worker t % W (see :mod:`ltdist.data.plan`). With W > 1
the workers run in torch DataLoader processes, whose in-order round robin over workers delivers
exactly that sequence; after a resume at batch k, DataLoader worker d plays logical worker
(k + d) % W so the round robin starts where the interrupted run stopped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ltdist.data.index import LongTailIndex, read_index
from ltdist.data.plan import StreamPlan, make_plan
from ltdist.data.tario import CORRUPT_IMAGE
from ltdist.data.worker import Payload, WorkerStream

log = logging.getLogger(__name__)
STATE_VERSION = 1


class DataSkipError(RuntimeError):
    """Too many samples were skipped (corrupt, invalid or lost); the message names the shards."""


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, C, H, W], normalised
    labels: torch.Tensor  # int64 [B]
    keys: list[str]


class _EpochDataset(IterableDataset):
    def __init__(self, plan: StreamPlan, epoch: int, start_batch: int, positions: list[int],
                 decode_skips: list[Counter], decode: bool):
        self.plan, self.epoch, self.start_batch = plan, epoch, start_batch
        self.positions, self.decode_skips, self.decode = positions, decode_skips, decode

    def worker_stream(self, worker: int) -> WorkerStream:
        _, done = self.plan.worker_batches(worker, self.start_batch)
        return WorkerStream(self.plan, self.epoch, worker, self.positions[worker], done,
                            self.decode_skips[worker], self.decode)

    def __iter__(self) -> Iterator[Payload]:
        info = get_worker_info()
        process = info.id if info is not None else 0
        return self.worker_stream((self.start_batch + process) % self.plan.num_workers).batches()


class TrainStream:
    """Iterate once per epoch: ``set_epoch(e)`` then ``for batch in stream``. Every rank yields
    ``batches_per_epoch`` batches. ``state_dict()`` taken after a consumed batch and restored with
    ``load_state_dict()`` continues with exactly the batches the uninterrupted run would have yielded.
    """

    def __init__(self, plan: StreamPlan, max_skip_fraction: float, use_processes: bool):
        self.plan, self.max_skip_fraction, self.use_processes = plan, max_skip_fraction, use_processes
        self.batches_per_epoch = plan.batches_per_epoch
        self.skip_counts: Counter = Counter()  # reason -> count over all finished epochs and this one
        self._finished: Counter = Counter()  # (shard, reason) -> count of finished epochs
        self._resuming = False
        self._reset(0)

    def _reset(self, epoch: int) -> None:
        w = self.plan.num_workers
        self.epoch, self.batches_done = epoch, 0
        self._pos = [0] * w
        self._skips = [Counter() for _ in range(w)]  # per worker, cumulative in the epoch
        self._read = [0] * w

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, except right after ``load_state_dict`` of a state
        saved in that same epoch: then the next iteration yields the rest of it (nothing if complete)."""
        resuming, self._resuming = self._resuming, False
        if resuming and epoch == self.epoch:
            return
        if self.batches_done:
            self._finished.update(self._epoch_skips())
        self._reset(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        for payload in self.payloads():
            yield Batch(payload["images"], payload["labels"], payload["keys"])

    def payloads(self, decode: bool = True) -> Iterator[Payload]:
        """The worker payloads of the rest of the epoch (``images`` None when not decoding)."""
        self._resuming = False
        dataset = _EpochDataset(self.plan, self.epoch, self.batches_done, list(self._pos),
                                [Counter({k: n for k, n in s.items() if k[1] == CORRUPT_IMAGE}) for s in self._skips],
                                decode)
        w = self.plan.num_workers
        if self.use_processes and w > 1:
            source: Iterator[Payload] = iter(DataLoader(dataset, batch_size=None, num_workers=w))
        else:
            source = _round_robin(dataset, self.batches_done, w)
        for payload in source:
            k = payload["worker"]
            self._pos[k], self._read[k] = payload["pos"], payload["read"]
            self._skips[k] = Counter({(s, r): n for s, r, n in payload["skips"]})
            self.batches_done += 1
            self._check_skips()
            yield payload

    def _epoch_skips(self) -> Counter:
        total: Counter = Counter()
        for s in self._skips:
            total.update(s)
        return total

    def skips_by_shard(self) -> Counter:
        """(shard file, reason) -> skipped count, over all epochs so far (corrupt images per emission)."""
        return self._finished + self._epoch_skips()

    def _check_skips(self) -> None:
        epoch = self._epoch_skips()
        self.skip_counts = Counter()
        for (_, reason), n in (self._finished + epoch).items():
            self.skip_counts[reason] += n
        decode_bad = sum(n for (_, r), n in epoch.items() if r == CORRUPT_IMAGE)
        read_bad = sum(epoch.values()) - decode_bad
        # Compare against the whole epoch's expected volume until more than that has been seen, so
        # a bad shard early in the epoch is judged by the rate it gives the epoch, not the first batch.
        expected = self.batches_per_epoch * self.plan.batch_size
        limit = self.max_skip_fraction
        if read_bad > limit * max(expected, sum(self._read)) or decode_bad > limit * max(expected, sum(self._pos)):
            shards = sorted({s for (s, _), n in epoch.items() if n})
            raise DataSkipError(
                f"rank {self.plan.rank} epoch {self.epoch}: skipped {read_bad} samples while reading and "
                f"{decode_bad} undecodable images, above data.max_skip_fraction={limit} of ~{expected} samples; "
                f"by reason {dict(self.skip_counts)}; shards: {', '.join(shards)}")

    def state_dict(self) -> dict:
        """Position after the last consumed batch (plain Python types, JSON-serialisable)."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done,
            "rank": self.plan.rank, "world_size": self.plan.world_size, "num_workers": self.plan.num_workers,
            "seed": self.plan.seed, "positions": list(self._pos), "read": list(self._read),
            "skips": [[[s, r, n] for (s, r), n in sorted(c.items())] for c in self._skips],
            "finished_skips": [[s, r, n] for (s, r), n in sorted(self._finished.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {"version": STATE_VERSION, "rank": self.plan.rank, "world_size": self.plan.world_size,
                "num_workers": self.plan.num_workers, "seed": self.plan.seed}
        wrong = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if wrong:
            raise ValueError(f"train stream state does not match this stream (saved, now): {wrong}")
        self._reset(int(state["epoch"]))
        self.batches_done = int(state["batches_done"])
        self._pos, self._read = list(state["positions"]), list(state["read"])
        self._skips = [Counter({(s, r): n for s, r, n in c}) for c in state["skips"]]
        self._finished = Counter({(s, r): n for s, r, n in state["finished_skips"]})
        self._resuming = True


def _round_robin(dataset: _EpochDataset, start_batch: int, workers: int) -> Iterator[Payload]:
    """In-process equivalent of the DataLoader's in-order round robin over worker processes."""
    streams = [dataset.worker_stream(w).batches() for w in range(workers)]
    for t in range(start_batch, dataset.plan.batches_per_epoch):
        yield next(streams[t % workers])


def build_train_stream(
    index: LongTailIndex | Path, *, batch_size: int, rank: int, world_size: int, num_workers: int,
    sampling_power: float, seed: int, image_size: int, channels: int, shuffle_buffer: int,
    max_skip_fraction: float, exclude_classes: Sequence[int] = (), exclude_keys: Mapping[str, int] | None = None,
) -> TrainStream:
    """The training stream of one rank. ``batch_size`` is the per-rank micro-batch; ``num_workers``
    DataLoader processes (0 = in-process); ``sampling_power`` p gives q_j ∝ n_j^p; ``exclude_keys``
    (key → label) are train samples never emitted."""
    if not isinstance(index, LongTailIndex):
        index = read_index(index)
    plan = make_plan(index, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                     sampling_power=sampling_power, seed=seed, image_size=image_size, channels=channels,
                     shuffle_buffer=shuffle_buffer, exclude_classes=exclude_classes, exclude_keys=exclude_keys)
    return TrainStream(plan, max_skip_fraction, use_processes=num_workers > 0)
