"""The training steps the engine benchmarks compare (:mod:`ltdist.bench.engine`, :mod:`ltdist.bench.engine_dist`):
one SGD step of cross-entropy on a batch, in plain PyTorch and through a DeepSpeed engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def ds_step(engine, images: torch.Tensor, labels: torch.Tensor) -> None:
    engine.backward(F.cross_entropy(engine(images), labels))
    engine.step()


def make_sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
