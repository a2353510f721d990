"""Checkpoints with our own commit marker: a checkpoint exists only once every rank finished its part.

Layout: ``<run_dir>/checkpoints/step_<N>/`` holds DeepSpeed's files (model, optimizer; ZeRO shards per
rank), one ``ltdist_rank<r>.pt`` per rank (data stream state, RNG states) and, written last by rank 0
after a barrier, ``commit.json`` (temp file, fsync, rename) listing every file with its size. DeepSpeed's
``latest`` file is never written nor read: a process killed mid-save leaves a directory without
``commit.json``, which :func:`latest_verified` skips.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ltdist.distributed import barrier
from ltdist.fileio import write_atomic

COMMIT_FILE = "commit.json"


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def rng_state() -> dict:
    """RNG states as tensors, ints and tuples only, so the rank file loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(engine, root: Path, step: int, client_state: dict, rank_state: dict, rank: int,
                    keep: int = 2) -> Path:
    """Save on every rank (a collective), then commit. ``client_state`` is global (step, epoch, counters);
    ``rank_state`` is this rank's own (data stream position, RNG). Keeps the newest ``keep`` commits."""
    tag = tag_for(step)
    directory = root / tag
    if rank == 0 and directory.exists():  # leftovers of a save that never committed
        shutil.rmtree(directory)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    write_atomic(directory / f"ltdist_rank{rank}.pt", lambda f: torch.save(rank_state, f))
    barrier()  # every rank's files are complete
    if rank == 0:
        files = {str(p.relative_to(directory)): p.stat().st_size
                 for p in sorted(directory.rglob("*")) if p.is_file() and p.name != COMMIT_FILE}
        world = dist.get_world_size() if dist.is_initialized() else 1
        missing = [r for r in range(world) if f"ltdist_rank{r}.pt" not in files]
        if missing:
            raise RuntimeError(f"checkpoint {directory}: ranks {missing} wrote no state; not committing")
        marker = {"step": step, "world_size": world, "files": files}
        write_atomic(directory / COMMIT_FILE, lambda f: f.write(json.dumps(marker, indent=1).encode()))
        _fsync_dir(directory)
        _prune(root, keep)
    barrier()
    return directory


def _verified(directory: Path) -> dict | None:
    """The commit marker if it exists and every file it lists has the recorded size."""
    try:
        marker = json.loads((directory / COMMIT_FILE).read_text())
        for name, size in marker["files"].items():
            if (directory / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker


def latest_verified(root: Path) -> tuple[Path, dict] | None:
    """(directory, commit marker) of the newest committed, intact checkpoint under ``root``, or None."""
    candidates = sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []
    for directory in candidates:
        marker = _verified(directory)
        if marker is not None:
            return directory, marker
    return None


def _prune(root: Path, keep: int) -> None:
    """Remove everything (committed or not) older than the ``keep`` newest committed checkpoints."""
    directories = sorted(root.glob("step_*"))
    committed = [d for d in directories if _verified(d) is not None]
    if len(committed) <= keep:
        return
    oldest_kept = committed[-keep]
    for directory in directories:
        if directory < oldest_kept:
            shutil.rmtree(directory, ignore_errors=True)


def load_checkpoint(engine, directory: Path, rank: int) -> tuple[dict, dict]:
    """Load DeepSpeed state (model, optimizer) from a verified checkpoint → (client_state, rank_state)."""
    _, client_state = engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    rank_file = directory / f"ltdist_rank{rank}.pt"
    if not rank_file.exists():
        raise RuntimeError(f"{rank_file} is missing: the checkpoint was written by a job with fewer ranks")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)  # no code from the run directory
    return client_state, rank_state
