"""Benchmark: the cost of a stage-1 objective's step relative to a plain cross-entropy step.

    ltdist bench objectives [--case resnet32:28:128] [--steps 10] [--out DIR]

Same model, batch and optimizer for every objective; one optimizer step = the objective's
``before_micro_step`` (MPCL: the meta step), one forward, the loss, backward, SGD step and
``after_micro_step`` (MPCL: the prototype EMA). The objectives alternate step by step (rotating the order,
:func:`ltdist.bench.harness.timed_rounds`) so that load drift on a shared machine hits them alike; the ratio
is the median of per-round ratios to CE.
Cases: ``ce``; ``mpcl (no meta-network)`` = CE + L_PC with EMA prototypes; ``mpcl, meta step every step``
with ``meta_inner=last_stage`` and ``all``.
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import sys

import numpy as np
import torch
from PIL import Image

from ltdist.bench.harness import add_out_argument, summarise, timed_rounds, write_results
from ltdist.data.meta_set import MetaSet
from ltdist.engine.objective import TrainingObjective
from ltdist.methods.objectives.logit_adjusted import cross_entropy
from ltdist.methods.objectives.mpcl import MPCLObjective
from ltdist.models import build_model


def _synthetic_meta_set(num_classes: int, per_class: int, size: int, channels: int) -> MetaSet:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(num_classes * per_class):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, channels) if channels == 3 else (size, size), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    return MetaSet("val", [f"m{i:05d}" for i in range(len(labels))], labels, images, num_classes)


def _objectives(feature_dim: int, num_classes: int, size: int, channels: int) -> dict[str, TrainingObjective]:
    meta_set = _synthetic_meta_set(num_classes, 10, size, channels)
    common = dict(num_classes=num_classes, feature_dim=feature_dim, lam=0.5, tau=0.07, momentum=0.999,
                  warmup_epochs=0, meta_optimizer="sgd", meta_lr=1e-3, meta_hidden=256, meta_init_std=0.0,
                  meta_interval=1,
                  meta_set=meta_set, meta_batch_size=0, seed=0, rank=0, image_size=size, channels=channels,
                  device=torch.device("cpu"), dtype=torch.float32)
    return {"ce": cross_entropy(),
            "mpcl, no meta-network (CE + L_PC)": MPCLObjective(meta_network=False, meta_inner="last_stage", **common),
            "mpcl, meta step last_stage": MPCLObjective(meta_network=True, meta_inner="last_stage", **common),
            "mpcl, meta step all": MPCLObjective(meta_network=True, meta_inner="all", **common)}


def _step(model, optimizer, objective: TrainingObjective, images, labels, step: int) -> None:
    objective.before_micro_step(model, images, labels, step=step, epoch=0, lr=0.01)
    logits, features = model(images, return_features=True)
    loss = objective.loss(features, logits.float(), labels, epoch=0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    objective.after_micro_step(features.detach(), labels)


def bench_objectives(arch: str, size: int, batch: int, channels: int, steps: int, warmup: int) -> dict:
    """Median step seconds per objective and the paired ratio to CE."""
    torch.manual_seed(0)
    num_classes = 10
    base = build_model(arch, num_classes=num_classes, channels=channels)
    objectives = _objectives(base.feature_dim, num_classes, size, channels)
    models = {name: copy.deepcopy(base) for name in objectives}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}
    images = torch.randn(batch, channels, size, size)
    labels = torch.randint(0, num_classes, (batch,))

    def loop(name: str):
        rounds = itertools.count()  # every loop runs once per round: its own call count is the round (the step)
        return lambda: _step(models[name], optimizers[name], objectives[name], images, labels, next(rounds))

    loops = {name: loop(name) for name in objectives}
    summary = summarise(timed_rounds(loops, steps, warmup), "ce")
    rows = [{"objective": name, "step_s": s["wall_s"], "paired_ratio_to_ce": s["paired_wall"]}
            for name, s in summary.items()]
    return {"arch": arch, "image_size": size, "batch": batch, "channels": channels, "steps": steps,
            "threads": torch.get_num_threads(), "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="resnet32:28:128", help="arch:image_size:batch")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    add_out_argument(parser, "objectives")
    args = parser.parse_args(argv)
    try:
        arch, size, batch = args.case.split(":")
        size, batch = int(size), int(batch)
    except ValueError:
        parser.error(f"--case is arch:image_size:batch, got {args.case!r}")
    result = bench_objectives(arch, size, batch, args.channels, args.steps, args.warmup)
    table = "\n".join([f"{arch} {size}px batch {batch}, {result['threads']} threads, {args.steps} timed steps",
                       f"{'objective':<36}{'step ms':>10}{'× CE':>8}",
                       *(f"{r['objective']:<36}{1e3 * r['step_s']:>10.1f}{r['paired_ratio_to_ce']:>8.2f}"
                         for r in result["results"])])
    print(table)
    print(f"wrote {write_results(args.out, 'objectives', args, table, **result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
