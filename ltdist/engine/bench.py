"""Benchmark: one optimizer step of the DeepSpeed engine vs a plain PyTorch loop, same model and batch.

    python -m ltdist.engine.bench [--cases resnet32:28:128 resnet50:224:8] [--zero-stage 0] [--out bench.json]

Single process (gloo group of 1, as DeepSpeed needs one). Both loops train an identical copy of the model
on the same in-memory batch; steps alternate plain / DeepSpeed (order swapped every pair) so that load
drift and position effects hit both alike. Prints
a table of median step times and the ratio, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ltdist.engine.ds_config import build_deepspeed_config, plan_batches


def _plain_step(model, optimizer, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _ds_step(engine, images, labels) -> None:
    engine.backward(F.cross_entropy(engine(images), labels))
    engine.step()


def bench_case(arch: str, image_size: int, batch: int, channels: int, steps: int, warmup: int, zero_stage: int,
               device: torch.device) -> dict:
    import deepspeed

    from ltdist.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, channels=channels).to(device)
    plain = copy.deepcopy(model)
    make_opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    config = build_deepspeed_config(plan_batches(batch, 1, 1), "fp32", zero_stage, grad_clip=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_opt(model), config=config,
                                           dist_init_required=False)
    plain_opt = make_opt(plain)
    images = torch.randn(batch, channels, image_size, image_size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"plain": [], "deepspeed": []}
    loops = (("plain", lambda: _plain_step(plain, plain_opt, images, labels)),
             ("deepspeed", lambda: _ds_step(engine, images, labels)))
    for i in range(warmup + steps):
        # Alternate which loop goes first: the second of a pair runs measurably slower (caches, allocator).
        for name, step in loops if i % 2 == 0 else loops[::-1]:
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    plain_s, ds_s = statistics.median(times["plain"]), statistics.median(times["deepspeed"])
    # On a shared machine the load drifts between steps; each plain step and the DeepSpeed step right after
    # it see about the same load, so the median of the per-pair ratios is the steadiest estimate.
    paired = statistics.median(d / p for p, d in zip(times["plain"], times["deepspeed"]))
    return {"arch": arch, "image_size": image_size, "batch": batch, "channels": channels, "zero_stage": zero_stage,
            "precision": "fp32", "device": str(device), "threads": torch.get_num_threads(), "steps": steps,
            "plain_step_s": plain_s, "deepspeed_step_s": ds_s, "ratio": ds_s / plain_s, "paired_ratio": paired,
            "ratio_of_minima": min(times["deepspeed"]) / min(times["plain"]),
            "plain_all_s": times["plain"], "deepspeed_all_s": times["deepspeed"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["resnet32:28:128", "resnet50:224:8"],
                        help="arch:image_size:batch")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("bench_engine.json"))
    args = parser.parse_args(argv)

    from ltdist.distributed import init_distributed
    from ltdist.engine.ds_ops import isolate_torch_extensions

    os.environ.setdefault("MASTER_PORT", "29517")
    env = init_distributed(args.device)
    isolate_torch_extensions()
    rows = []
    for case in args.cases:
        try:
            arch, size, batch = case.split(":")
            size, batch = int(size), int(batch)
        except ValueError:
            parser.error(f"--cases entries are arch:image_size:batch, got {case!r}")
        rows.append(bench_case(arch, size, batch, args.channels, args.steps, args.warmup, args.zero_stage,
                               env.device))
    print(f"{'model':<16}{'px':>5}{'batch':>7}{'ZeRO':>6}{'plain ms':>11}{'DeepSpeed ms':>14}{'ratio':>8}"
          f"{'paired':>8}{'of min':>8}")
    for r in rows:
        print(f"{r['arch']:<16}{r['image_size']:>5}{r['batch']:>7}{r['zero_stage']:>6}"
              f"{1e3 * r['plain_step_s']:>11.1f}{1e3 * r['deepspeed_step_s']:>14.1f}{r['ratio']:>8.3f}"
              f"{r['paired_ratio']:>8.3f}{r['ratio_of_minima']:>8.3f}")
    print("ms: median step time; ratio: of medians; paired: median of per-step-pair ratios; of min: of fastest")
    args.out.write_text(json.dumps({"target_ratio": 1.10, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
