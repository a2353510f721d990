"""Benchmark, distributed: DeepSpeed ZeRO 0/1/2 against torch DistributedDataParallel on R ranks (gloo).

    ltdist bench engine-dist [--cases resnet32:28:128] [--ranks 2] [--steps 10] [--threads 1]
                             [--variant 'NAME:STAGE:JSON' ...] [--profile N] [--out DIR]

The batch of a case is the global batch: each of the R processes trains on batch/R samples. Every rank
holds one copy of the model per mode (DDP, ZeRO-0, ZeRO-1, ZeRO-2; same initial weights) and the rounds
rotate through the modes (:func:`ltdist.bench.harness.timed_rounds`). A barrier starts every step, and
a step's time is the slowest rank's (all-reduced max), which is what a synchronous job waits for. Prints
median wall and CPU ms and the per-round ratio to DDP; writes them to ``DIR/results.json``.

``--variant NAME:STAGE:JSON`` adds a mode: ZeRO stage STAGE with JSON (raw DeepSpeed keys) merged into
ltdist's config, e.g. ``'zero2-overlap:2:{"zero_optimization": {"overlap_comm": true}}'``, timed in the same
rounds as the others. ``--profile N`` then profiles N steps of every mode with torch.profiler on each rank
and prints rank 0's top operators and those that grew most against DDP.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltdist.bench.harness import add_out_argument, format_profile, profile_loops, summarise, timed_rounds, write_results
from ltdist.bench.steps import ds_step, make_sgd, plain_step
from ltdist.engine.ds_config import build_deepspeed_config, plan_batches

MODES = ("ddp", "zero0", "zero1", "zero2")


def _bench_case(rank: int, world: int, arch: str, size: int, batch: int, args: dict) -> dict:
    import deepspeed

    from ltdist.models import build_model

    plan = plan_batches(batch, world, 1)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, channels=args["channels"])
    ddp_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    ddp_opt = make_sgd(ddp_model)
    engines = {}
    for name, stage, extra in [*((f"zero{s}", s, None) for s in (0, 1, 2)), *args["variants"]]:
        replica = copy.deepcopy(model)
        config = build_deepspeed_config(plan, "fp32", stage, grad_clip=0.0, extra=extra)
        engines[name], _, _, _ = deepspeed.initialize(model=replica, optimizer=make_sgd(replica), config=config,
                                                      dist_init_required=False)
    torch.manual_seed(1 + rank)  # each rank its own share of the global batch
    images = torch.randn(plan.micro_batch, args["channels"], size, size)
    labels = torch.randint(0, 10, (plan.micro_batch,))
    loops = {"ddp": lambda: plain_step(ddp_model, ddp_opt, images, labels),
             **{name: (lambda e=e: ds_step(e, images, labels)) for name, e in engines.items()}}
    times = timed_rounds(loops, args["steps"], args["warmup"], sync=dist.barrier)
    for t in times.values():  # the slowest rank sets the pace of a synchronous step
        for kind in ("wall", "cpu"):
            values = torch.tensor(t[kind], dtype=torch.float64)
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            t[kind] = values.tolist()
    row = {"arch": arch, "image_size": size, "global_batch": batch, "ranks": world, "micro_batch": plan.micro_batch,
           "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
           "steps": args["steps"], "variants": {name: extra for name, _, extra in args["variants"]},
           "modes": summarise(times, "ddp"), "times": times}
    if args["profile"]:
        row["profile"] = profile_loops(loops, args["profile"])  # every rank runs the same collectives
    return row


def _rank_main(rank: int, world: int, port: int, cases: list[tuple[str, int, int]], args: dict,
               rows_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    from ltdist.distributed import init_distributed
    from ltdist.engine.ds_ops import isolate_torch_extensions

    init_distributed("cpu")
    isolate_torch_extensions()
    rows = [_bench_case(rank, world, arch, size, batch, args) for arch, size, batch in cases]
    if rank == 0:  # handed to the parent process, which writes the results
        Path(rows_path).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["resnet32:28:128"], help="arch:image_size:global_batch")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (0: torch's default)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:STAGE:JSON",
                        help="another DeepSpeed mode: ZeRO STAGE with JSON merged into ltdist's config; repeatable")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps of every mode")
    add_out_argument(parser, "engine-dist")
    args = parser.parse_args(argv)
    variants = []
    for spec in args.variant:
        name, stage, raw = [*spec.split(":", 2), "", ""][:3]
        try:
            variants.append((name, int(stage), json.loads(raw)))
        except ValueError:
            parser.error(f"--variant entries are NAME:STAGE:JSON, e.g. 'zero2-overlap:2:{{\"zero_optimization\": "
                         f"{{\"overlap_comm\": true}}}}', got {spec!r}")
        if name in MODES or not name or int(stage) not in (0, 1, 2):
            parser.error(f"--variant {spec!r}: the name must be new (not {MODES}) and the stage 0, 1 or 2")
    cases = []
    for case in args.cases:
        try:
            arch, size, batch = case.split(":")
            cases.append((arch, int(size), int(batch)))
        except ValueError:
            parser.error(f"--cases entries are arch:image_size:global_batch, got {case!r}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"channels": args.channels, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
               "variants": variants, "profile": args.profile}
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rank0_rows.json"
    mp.start_processes(_rank_main, args=(args.ranks, port, cases, options, str(rows_path)), nprocs=args.ranks,
                       start_method="spawn")
    rows = json.loads(rows_path.read_text())
    rows_path.unlink()
    lines = [f"{'model':<12}{'px':>4}{'batch':>6}{'ranks':>6}{'thr':>4}  {'mode':<7}{'wall ms':>9}{'CPU ms':>9}"
             f"{'vs DDP wall':>13}{'vs DDP CPU':>12}"]
    for r in rows:
        for mode, s in r["modes"].items():
            lines.append(f"{r['arch']:<12}{r['image_size']:>4}{r['global_batch']:>6}{r['ranks']:>6}{r['threads']:>4}  "
                         f"{mode:<7}{1e3 * s['wall_s']:>9.1f}{1e3 * s['cpu_s']:>9.1f}{s['paired_wall']:>13.3f}"
                         f"{s['paired_cpu']:>12.3f}")
    lines.append("ms: median per step of the slowest rank; vs DDP: median over rounds of the step's time / DDP's in "
                 "the same round; batch: global")
    for r in rows:
        if "profile" in r:
            lines += [f"\n== {r['arch']} {r['image_size']} px, global batch {r['global_batch']} (rank 0)",
                      *format_profile(r["profile"])]
    table = "\n".join(lines)
    print(table)
    print(f"wrote {write_results(args.out, 'engine-dist', args, table, results=rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
