"""Benchmark: one optimizer step of the DeepSpeed engine vs a plain PyTorch loop, same model and batch.

    ltdist bench engine [--cases resnet32:28:128 resnet50:224:8] [--zero-stage 0] [--threads 1]
                        [--precision bf16] [--no-channels-last] [--compile] [--profile 4] [--out DIR]

Single process (gloo group of 1, as DeepSpeed needs one). Three loops train identical copies of the model
on the same in-memory batch: plain PyTorch, DeepSpeed as it ships (``deepspeed.initialize`` on ltdist's
config) and DeepSpeed as ltdist's trainer sets it up (:func:`ltdist.engine.ds_config.skip_single_rank_allreduce`).
Steps rotate through the loops (:func:`ltdist.bench.harness.timed_rounds`) so that load drift and position
effects hit all alike. Each step is timed
in wall time and in this process's CPU time: on a machine shared with other jobs the CPU time (with
``--threads 1``) is the steadier figure. ``--profile N`` then profiles N steps of each loop with
torch.profiler and prints the top operators and where DeepSpeed's step differs from the plain one.
The distributed comparison (2 ranks, DDP vs ZeRO 0/1/2) is :mod:`ltdist.bench.engine_dist`.

``--precision bf16``: every loop trains a bf16 model on bf16 batches (DeepSpeed's bf16 mode keeps fp32 master
weights, the plain loop steps the bf16 parameters). The batch takes the trainer's memory format (channels-last
on CUDA unless ``--no-channels-last``) and ``--compile`` compiles every copy's backbone, as ``trainer.compile``
does (:mod:`ltdist.engine.speed`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from ltdist.bench.harness import add_out_argument, format_profile, profile_loops, summarise, timed_rounds, write_results
from ltdist.bench.steps import ds_step, make_sgd, plain_step
from ltdist.engine import speed
from ltdist.engine.ds_config import build_deepspeed_config, plan_batches, skip_single_rank_allreduce

LOOPS = ("plain", "deepspeed", "ltdist")  # plain PyTorch, DeepSpeed as shipped, DeepSpeed as ltdist sets it up


def bench_case(arch: str, image_size: int, batch: int, channels: int, steps: int, warmup: int, zero_stage: int,
               device: torch.device, profile_steps: int = 0, precision: str = "fp32", channels_last: bool = False,
               compile_backbone: bool = False) -> dict:
    import deepspeed

    from ltdist.models import build_model

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, num_classes=10, channels=channels).to(device, dtype)
    copies = {name: copy.deepcopy(model) for name in LOOPS}
    if compile_backbone:
        for m in copies.values():
            speed.compile_backbone(m)
    config = build_deepspeed_config(plan_batches(batch, 1, 1), precision, zero_stage, grad_clip=0.0)
    engines = {}
    for name in ("deepspeed", "ltdist"):
        engines[name], _, _, _ = deepspeed.initialize(model=copies[name], optimizer=make_sgd(copies[name]),
                                                      config=config, dist_init_required=False)
    skip_single_rank_allreduce(engines["ltdist"])
    plain_opt = make_sgd(copies["plain"])
    images = torch.randn(batch, channels, image_size, image_size, device=device, dtype=dtype).contiguous(
        memory_format=fmt)
    labels = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loops = {"plain": lambda: plain_step(copies["plain"], plain_opt, images, labels),
             "deepspeed": lambda: ds_step(engines["deepspeed"], images, labels),
             "ltdist": lambda: ds_step(engines["ltdist"], images, labels)}
    times = timed_rounds(loops, steps, warmup, sync)
    row = {"arch": arch, "image_size": image_size, "batch": batch, "channels": channels, "zero_stage": zero_stage,
           "precision": precision, "channels_last": channels_last, "compile": compile_backbone,
           "device": str(device), "threads": torch.get_num_threads(), "steps": steps,
           "loops": summarise(times, "plain"), "times": times}
    if profile_steps:
        row["profile"] = profile_loops(loops, profile_steps)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["resnet32:28:128", "resnet50:224:8"],
                        help="arch:image_size:batch")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps of each loop")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="model and batch in channels-last format (default: on for cuda, as trainer.memory_format)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every loop's backbone (trainer.compile)")
    add_out_argument(parser, "engine")
    parser.add_argument("--objectives", action="store_true",
                        help="then time the stage-1 objectives on the first case (MPCL with and without the meta "
                             "step vs CE; ltdist bench objectives), written to DIR/objectives")
    args = parser.parse_args(argv)

    from ltdist.distributed import init_distributed
    from ltdist.engine.ds_ops import isolate_torch_extensions

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29517")
    env = init_distributed(args.device)
    isolate_torch_extensions()
    speed.set_backend_flags(cudnn_benchmark=True, tf32=True)  # the trainer's defaults
    rows = []
    for case in args.cases:
        try:
            arch, size, batch = case.split(":")
            size, batch = int(size), int(batch)
        except ValueError:
            parser.error(f"--cases entries are arch:image_size:batch, got {case!r}")
        channels_last = speed.memory_format("auto", env.device) == torch.channels_last \
            if args.channels_last is None else args.channels_last
        rows.append(bench_case(arch, size, batch, args.channels, args.steps, args.warmup, args.zero_stage,
                               env.device, args.profile, args.precision, channels_last, args.compile))
    lines = [f"{'model':<12}{'px':>4}{'batch':>6}{'thr':>4}  {'loop':<10}{'wall ms':>9}{'CPU ms':>9}"
             f"{'paired wall':>13}{'paired CPU':>12}"]
    for r in rows:
        for name, s in r["loops"].items():
            lines.append(f"{r['arch']:<12}{r['image_size']:>4}{r['batch']:>6}{r['threads']:>4}  {name:<10}"
                         f"{1e3 * s['wall_s']:>9.1f}{1e3 * s['cpu_s']:>9.1f}{s['paired_wall']:>13.3f}"
                         f"{s['paired_cpu']:>12.3f}")
    lines.append("ms: median per step; paired: median over rounds of the step's time / the plain step's time in the "
                 "same round; deepspeed: as shipped; ltdist: as the trainer sets it up")
    for r in rows:
        if "profile" in r:
            lines += [f"\n== {r['arch']} {r['image_size']} px, batch {r['batch']}", *format_profile(r["profile"])]
    table = "\n".join(lines)
    print(table)
    print(f"wrote {write_results(args.out, 'engine', args, table, target_ratio=1.10, results=rows)}")
    if args.objectives:
        from ltdist.bench import objectives

        print()
        return objectives.main(["--case", args.cases[0], "--channels", str(args.channels), "--steps",
                                str(args.steps), "--warmup", str(args.warmup), "--out", str(args.out / "objectives")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
