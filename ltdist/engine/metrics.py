"""Training metrics: windowed step statistics, metrics.jsonl / TensorBoard sink, per-epoch validation."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ltdist.class_groups import group_accuracy

log = logging.getLogger(__name__)


class StepWindow:
    """Sums over the steps since the last log line (values already all-reduced over ranks)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = self.correct = self.samples = 0.0
        self.data_wait_s = 0.0
        self.started = time.perf_counter()

    def add(self, loss_sum: float, correct: float, samples: float) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.samples += samples

    def summary(self) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        n = max(self.samples, 1.0)
        return {"loss": self.loss_sum / n, "accuracy": self.correct / n, "images_per_s": self.samples / elapsed,
                "data_wait_fraction": min(self.data_wait_s / elapsed, 1.0)}


def tensorboard_writer(directory: Path, is_main: bool):
    """A ``SummaryWriter`` on ``directory`` for rank 0 when the ``tensorboard`` extra is installed, else None.
    metrics.jsonl stays the record of a run; the event files are a view of it."""
    if not is_main or importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(directory))


def add_scalars(writer, record: dict, step: int, prefix: str) -> None:
    """Every int/float field of ``record`` as the scalar ``<prefix>/<key>`` at ``step`` (bools and None skipped)."""
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    writer.flush()


class MetricsSink:
    """Rank 0 writes each record to metrics.jsonl (through ``append``) and, when installed, TensorBoard."""

    def __init__(self, append: Callable[[dict], None], tensorboard_dir: Path | None, is_main: bool):
        self.append = append
        self.writer = tensorboard_writer(tensorboard_dir, is_main) if tensorboard_dir is not None else None

    def write(self, record: dict, step: int) -> None:
        self.append(record)
        if self.writer is not None:
            add_scalars(self.writer, record, step, record.get("event", "train"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable, groups: dict[str, list[int]], num_classes: int,
             device: torch.device, dtype: torch.dtype) -> dict[str, float | None]:
    """Top-1 on many / medium / few / all over a split that ``batches`` covers once across ranks.

    Predictions of all ranks are gathered (a collective); every rank returns the same numbers.
    """
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for batch in batches:
        logits = model(batch.images.to(device, dtype))
        predictions.append(logits.argmax(1).cpu())
        labels.append(batch.labels.cpu())
    model.train(was_training)
    mine = (torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long),
            torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    all_predictions = torch.cat([p for p, _ in everyone])
    all_labels = torch.cat([y for _, y in everyone])
    return group_accuracy(all_predictions, all_labels, groups, num_classes)
