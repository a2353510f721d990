"""Explicit distributed setup: ranks from submitit's JobEnvironment or torchrun variables."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``device`` is the torch device its rank computes on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    backend: str
    device: torch.device
    hostname: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _from_submitit() -> dict | None:
    try:
        import submitit
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return None
    hosts = list(env.hostnames)
    return dict(rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank,
                local_world_size=env.num_tasks // max(env.num_nodes, 1), node_rank=env.node,
                master_addr=hosts[0] if hosts else "127.0.0.1", job_id=str(env.job_id))


def _from_torchrun() -> dict | None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return dict(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                local_world_size=local_world, node_rank=int(os.environ.get("GROUP_RANK", 0)),
                master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                job_id=os.environ.get("TORCHELASTIC_RUN_ID", ""))


def _port_for_job(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes do not collide."""
    digits = "".join(c for c in job_id if c.isdigit())
    return 20000 + int(digits[-4:] or 0) % 20000


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` → the rank's GPU when CUDA is available, else CPU."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but torch sees no CUDA device on this node")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _loopback_store(port: int, rank: int, world_size: int, timeout_s: int) -> dist.TCPStore:
    """The rendezvous store on 127.0.0.1 only: torch's TCPStore server listens on every interface, so rank 0
    binds the socket itself and hands it over; the other ranks connect to it as clients."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, port))
    listener.listen(max(world_size, 128))
    store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout, master_listen_fd=listener.fileno())
    # The store owns the descriptor now and closes it at shutdown; Python must never close it (by then the
    # number may belong to another file), so the socket object lets go of it.
    listener.detach()
    return store


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join (or create) the default process group; gloo on CPU, nccl on GPU.

    Ranks come from submitit's JobEnvironment, else torchrun variables, else a single process.
    MASTER_ADDR/MASTER_PORT already in the environment win over derived ones, except on one machine
    (submitit's local executor, a single process, or a loopback MASTER_ADDR): there the rendezvous store
    and gloo listen on 127.0.0.1 only, so nothing on the network can join the job or talk to its unauthenticated store.
    """
    local = os.environ.get("SUBMITIT_EXECUTOR") == "local"
    info = _from_submitit() or _from_torchrun() or dict(
        rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, master_addr=LOOPBACK, job_id="")
    given = os.environ.get("MASTER_ADDR", info["master_addr"])
    local = local or info["world_size"] == 1 or given in ("localhost", "::1") or given.startswith("127.")
    job_id = info.pop("job_id")
    if local:
        os.environ["MASTER_ADDR"] = LOOPBACK
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    addr = os.environ.setdefault("MASTER_ADDR", info.pop("master_addr"))
    port = int(os.environ.setdefault("MASTER_PORT", str(_port_for_job(job_id) if job_id else 29500)))
    dev = resolve_device(device, info["local_rank"])
    backend = "nccl" if dev.type == "cuda" else "gloo"
    os.environ.update(RANK=str(info["rank"]), WORLD_SIZE=str(info["world_size"]), LOCAL_RANK=str(info["local_rank"]),
                      LOCAL_WORLD_SIZE=str(info["local_world_size"]))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if local:
            store = _loopback_store(port, info["rank"], info["world_size"], timeout_s)
            dist.init_process_group(backend=backend, store=store, rank=info["rank"], world_size=info["world_size"],
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}", rank=info["rank"],
                                    world_size=info["world_size"], timeout=timeout)
    return DistEnv(master_port=port, master_addr=addr, backend=backend, device=dev,
                   hostname=socket.gethostname(), **info)


def barrier() -> None:
    """All ranks meet here; a no-op without a process group or with a single rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
