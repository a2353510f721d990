"""Preemption and time limits: the signal only sets a flag; ranks act on it together.

submitit sends SIGUSR2 (its preemption signal) to every task before a time limit or when the job is
preempted, and its own handler checkpoints and requeues at once, wherever the program is. Saving from
inside a signal handler in the middle of a step (and of collectives) is unsafe, so
:func:`install_preemption_handler` replaces it with one that records the request; the training loop
calls :func:`preemption_agreed` at step boundaries (a collective: every rank learns whether any rank was
signalled), saves on all ranks, then calls :func:`requeue_and_exit`, which runs submitit's original
handler on rank 0 (``Job.checkpoint`` → requeue → exit).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ltdist.distributed import barrier

log = logging.getLogger(__name__)

_state: dict = {"requested": False, "submitit_handler": None}


def _on_signal(signum: int, frame) -> None:
    log.warning("received %s: will save and requeue at the next step boundary", signal.Signals(signum).name)
    _state["requested"] = True


def install_preemption_handler(sig: signal.Signals = signal.SIGUSR2) -> None:
    """Replace submitit's handler for ``sig`` (kept for :func:`requeue_and_exit`) with a flag setter."""
    current = signal.getsignal(sig)
    if current is not _on_signal:
        _state["submitit_handler"] = current
    _state["requested"] = False
    signal.signal(sig, _on_signal)


def request_preemption() -> None:
    """Act as if the preemption signal arrived (tests, and `ltdist` tooling)."""
    _state["requested"] = True


def preemption_requested_locally() -> bool:
    return bool(_state["requested"])


def preemption_agreed() -> bool:
    """True on every rank iff some rank was signalled. A collective: call it on all ranks together."""
    flag = torch.tensor([1.0 if _state["requested"] else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


class Preempted(SystemExit):
    """Raised after the state is saved when the job should stop and wait to be requeued."""


def requeue_and_exit(rank: int, sig: signal.Signals = signal.SIGUSR2) -> None:
    """After all ranks saved: rank 0 lets submitit checkpoint (``Job.checkpoint``) and requeue.

    Outside a submitit job (no handler was replaced) raise :class:`Preempted`, so that callers
    such as tests see a clean stop with the state on disk.
    """
    handler: Callable | None = _state["submitit_handler"]
    barrier()
    if not callable(handler):
        raise Preempted(1)
    if rank == 0:
        handler(sig, None)  # submitit: checkpoint() → scontrol requeue → sys.exit(-1)
    # Other ranks wait to be stopped by the requeue; exiting first could take the step down early.
    time.sleep(120)
    sys.exit(-1)
