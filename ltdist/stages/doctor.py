"""The ``doctor`` stage: every rank joins the process group and all-reduces its rank + 1.

Rank 0 writes ``doctor.json`` with the world size, every rank's host, device and backend, the
all-reduce result (expected world·(world+1)/2) and the versions of the stack. The first thing to run
on a new cluster.
"""

from __future__ import annotations

import importlib.metadata
import json
import socket

import torch
import torch.distributed as dist

from ltdist.stages import StageContext

PACKAGES = ("torch", "deepspeed", "triton", "webdataset", "submitit", "omegaconf", "ltdist")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(ctx: StageContext) -> None:
    env = ctx.dist
    device = env.device
    value = torch.tensor([float(env.rank + 1)], device=device)
    dist.all_reduce(value)
    me = {"rank": env.rank, "local_rank": env.local_rank, "node_rank": env.node_rank,
          "hostname": socket.gethostname(), "device": str(device)}
    everyone: list[dict | None] = [None] * env.world_size
    dist.all_gather_object(everyone, me)
    if not env.is_main:
        return
    expected = env.world_size * (env.world_size + 1) / 2
    report = {
        "world_size": env.world_size,
        "backend": env.backend,
        "master": f"{env.master_addr}:{env.master_port}",
        "ranks": everyone,
        "hostnames": sorted({r["hostname"] for r in everyone}),
        "all_reduce": {"op": "sum of rank+1", "result": value.item(), "expected": expected,
                       "ok": value.item() == expected},
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "versions": {p: _version(p) for p in PACKAGES},
    }
    (ctx.run_dir / "doctor.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"doctor: world size {env.world_size}, backend {env.backend}, all-reduce "
          f"{value.item():g} (expected {expected:g}) -> {'OK' if report['all_reduce']['ok'] else 'MISMATCH'}",
          flush=True)
