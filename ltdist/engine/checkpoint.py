"""Checkpoints with our own commit marker: a checkpoint exists only once every rank finished its part,
and it is trusted only while every byte is what was written.

Layout: ``<run_dir>/checkpoints/step_<N>/`` holds DeepSpeed's files (model, optimizer; ZeRO shards per
rank), one ``ltdist_rank<r>.pt`` per rank (data stream state, RNG states) and, written last by rank 0
after every rank reported, ``commit.json`` (temp file, fsync, rename) listing every file with its size
and SHA-256, plus the training settings the checkpoint was made with (:mod:`ltdist.engine.fingerprint`).
DeepSpeed's ``latest`` file is never written nor read.

Integrity: each rank hashes the files it wrote right after writing them (read back from the page cache;
DeepSpeed's checkpoint engine is wrapped so every ``save`` is seen); rank 0 hashes what no rank claimed
(DeepSpeed's recovery scripts). Resuming, rank 0 walks the checkpoints newest to oldest, re-hashing
every file, logs each one it rejects (file, reason) and moves it to ``checkpoints/rejected/``; every rank
loads the first that verifies. Pruning trusts the markers (each kept checkpoint was verified at resume or
written by this job).

Safe loading: every file of a checkpoint is read into memory, its SHA-256 compared with ``commit.json``
and only then unpickled, with ``torch.load(weights_only=True)``: tensors and plain containers, plus the
few DeepSpeed classes :func:`_deepspeed_safe_globals` lists (an enum and the loss-scaler state),
never an arbitrary callable. A file planted in a run directory cannot run code at resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ltdist.distributed import barrier
from ltdist.fileio import write_atomic

log = logging.getLogger(__name__)

COMMIT_FILE = "commit.json"
RESTART_KEY = "trainer.allow_restart_from_scratch"
REJECTED_DIR = "rejected"
_CHUNK = 4 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (or written); the message names the directory or file and why."""


class CheckpointSpaceError(CheckpointError):
    """The filesystem holding the checkpoints has no room for the next one."""


def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into its own checkpoint files besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def format_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def safe_load(path: Path, expected_sha256: str | None = None, map_location="cpu"):
    """``torch.load(weights_only=True)`` of ``path`` (DeepSpeed's classes of :func:`_deepspeed_safe_globals`
    allowed), after checking its SHA-256 when ``expected_sha256`` is given. Errors name the file."""
    path = Path(path)
    data = path.read_bytes()
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise CheckpointError(f"{path}: SHA-256 {digest[:16]}… differs from {expected_sha256[:16]}… recorded in "
                                  f"{COMMIT_FILE}: the file changed after it was written; not loading it")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle (only tensors, plain containers and DeepSpeed's "
                              f"checkpoint classes are loaded): {e}") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded: {type(e).__name__}: {e}") from e


class _HashingCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: every file it saves is hashed right after it is written, and
    every file it loads goes through :func:`safe_load` against the hashes of the checkpoint being loaded."""

    def __init__(self, inner):
        self._inner = inner
        self.written: dict[str, dict] = {}  # absolute path -> {"size", "sha256"}
        self.expected: dict[str, str] = {}  # absolute path -> sha256, set before a load

    def save(self, state_dict, path: str) -> None:
        self._inner.save(state_dict, path)
        self.written[str(Path(path).absolute())] = {"size": os.path.getsize(path), "sha256": sha256_file(Path(path))}

    def load(self, path: str, map_location=None):
        key = str(Path(path).absolute())
        if key not in self.expected:
            raise CheckpointError(f"{path} is not listed in the {COMMIT_FILE} of the checkpoint being loaded")
        return safe_load(Path(path), self.expected[key], map_location or "cpu")

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _hashing_engine(engine) -> _HashingCheckpointEngine:
    if not isinstance(engine.checkpoint_engine, _HashingCheckpointEngine):
        engine.checkpoint_engine = _HashingCheckpointEngine(engine.checkpoint_engine)
    return engine.checkpoint_engine


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _from_rank0(value):
    """``value`` as rank 0 computed it, on every rank (a collective)."""
    if _world() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _raise_if(message: str | None, error: type[CheckpointError] = CheckpointError) -> None:
    if message:
        raise error(message)


# ---- saving --------------------------------------------------------------------------------------------

def _committed(root: Path) -> list[tuple[Path, dict]]:
    """(directory, marker) of every checkpoint with a readable commit marker, oldest first (not re-hashed)."""
    found = []
    for directory in sorted(root.glob("step_*")) if root.is_dir() else []:
        try:
            found.append((directory, json.loads((directory / COMMIT_FILE).read_text())))
        except (OSError, ValueError):
            continue
    return found


def _size_of(marker: dict) -> int:
    return sum(entry["size"] for entry in marker["files"].values())


def _estimated_size(engine, root: Path) -> int:
    """Bytes the next checkpoint needs: the newest one's size, or for a first one, three fp32 copies of the
    parameters (weights, optimizer state, master copy); plus 5 % and 64 KiB for filesystem overhead."""
    committed = _committed(root)
    size = _size_of(committed[-1][1]) if committed else 3 * sum(p.numel() * 4 for p in engine.module.parameters())
    return int(1.05 * size) + (64 << 10)


def _make_room(engine, root: Path, keep: int) -> str | None:
    """Rank 0, before a save: remove leftovers of saves that never committed and, when the free space would
    not hold the next checkpoint, the oldest committed ones down to ``max(keep - 1, 1)`` (so the disk never
    needs more than one checkpoint beyond those kept). Returns the no-space message when that cannot make
    room; then nothing is removed but leftovers."""
    committed = {d for d, _ in _committed(root)}
    for directory in root.glob("step_*"):
        if directory not in committed:
            shutil.rmtree(directory, ignore_errors=True)
    need = _estimated_size(engine, root)
    free = shutil.disk_usage(root).free
    if free >= need:
        return None
    ordered = _committed(root)
    removable = ordered[:max(len(ordered) - max(keep - 1, 1), 0)]
    if free + sum(_size_of(m) for _, m in removable) < need:
        return _no_space(root, free, need)
    for directory, _ in removable:
        log.warning("little space left in %s (%s free, a checkpoint needs ~%s): removing %s before saving",
                    root, format_bytes(free), format_bytes(need), directory.name)
        shutil.rmtree(directory, ignore_errors=True)
    return None


def _no_space(root: Path, free: int, need: int) -> str:
    return (f"no space left on device: {root}, {format_bytes(free)} free, checkpoint needs ~{format_bytes(need)} "
            f"(older checkpoints are kept; free space or lower trainer.keep_checkpoints)")


def save_checkpoint(engine, root: Path, step: int, client_state: dict, rank_state: dict, rank: int,
                    keep: int = 2, settings: dict | None = None) -> Path:
    """Save on every rank (a collective), then commit. ``client_state`` is global (step, epoch, counters);
    ``rank_state`` is this rank's own (data stream position, RNG); ``settings`` the training settings
    recorded in the marker. Keeps the newest ``keep`` commits."""
    tag = tag_for(step)
    directory = root / tag
    root.mkdir(parents=True, exist_ok=True)
    refusal = None
    if rank == 0:
        if directory.exists():  # leftovers of a save that never committed, or a checkpoint given up on
            shutil.rmtree(directory)
        refusal = _make_room(engine, root, keep)
    _raise_if(_from_rank0(refusal), CheckpointSpaceError)
    hashing = _hashing_engine(engine)
    hashing.written.clear()
    started = time.perf_counter()
    rank_file = directory / f"ltdist_rank{rank}.pt"
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        write_atomic(rank_file, lambda f: torch.save(rank_state, f))
    except Exception as e:
        free, need = shutil.disk_usage(root).free, _estimated_size(engine, root)
        if free < need or (isinstance(e, OSError) and e.errno == 28):
            shutil.rmtree(directory, ignore_errors=True)
            raise CheckpointSpaceError(_no_space(root, free, need)) from e
        raise
    hashing.written[str(rank_file.absolute())] = {"size": rank_file.stat().st_size, "sha256": sha256_file(rank_file)}
    mine = {str(Path(p).relative_to(directory.absolute())): entry for p, entry in hashing.written.items()}
    everyone: list = [None] * _world()
    if _world() > 1:
        dist.all_gather_object(everyone, mine)  # also the barrier: every rank's files are complete
    else:
        everyone = [mine]
    if rank == 0:
        files = {name: entry for part in everyone for name, entry in part.items()}
        for path in sorted(directory.rglob("*")):  # what no rank's checkpoint engine wrote (recovery scripts)
            name = str(path.relative_to(directory))
            if path.is_file() and name not in files and name != COMMIT_FILE:
                files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        missing = [r for r in range(_world()) if f"ltdist_rank{r}.pt" not in files]
        if missing:
            raise RuntimeError(f"checkpoint {directory}: ranks {missing} wrote no state; not committing")
        marker = {"step": step, "world_size": _world(), "files": dict(sorted(files.items())),
                  "settings": settings or {}}
        write_atomic(directory / COMMIT_FILE, lambda f: f.write(json.dumps(marker, indent=1).encode()))
        _fsync_dir(directory)
        log.info("checkpoint %s: %d files, %s, written and hashed in %.2f s", directory.name, len(files),
                 format_bytes(_size_of(marker)), time.perf_counter() - started)
        _prune(root, keep)
    barrier()
    return directory


def _prune(root: Path, keep: int) -> None:
    """Remove everything (committed or not) older than the ``keep`` newest committed checkpoints."""
    committed = [d for d, _ in _committed(root)]
    if len(committed) <= keep:
        return
    oldest_kept = committed[-keep]
    for directory in sorted(root.glob("step_*")):
        if directory < oldest_kept:
            shutil.rmtree(directory, ignore_errors=True)


# ---- verifying and loading -----------------------------------------------------------------------------

def verify(directory: Path) -> tuple[dict | None, str]:
    """(commit marker, "") when every file the marker lists has its recorded size and SHA-256, else
    (None, reason naming the file)."""
    marker_path = directory / COMMIT_FILE
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return None, f"{marker_path} is missing (the save never completed)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{marker_path} is unreadable or lacks per-file SHA-256 hashes ({type(e).__name__}: {e})"
    for name, size, sha in entries:
        path = directory / name
        try:
            actual = path.stat().st_size
        except OSError:
            return None, f"{path} is missing"
        if actual != size:
            return None, f"{path} has {actual} bytes, {size} recorded"
        if sha256_file(path) != sha:
            return None, f"{path}: SHA-256 differs from the one recorded (same size: the content changed)"
    return marker, ""


def find_resumable(root: Path) -> tuple[tuple[Path, dict] | None, list[Path]]:
    """(newest checkpoint under ``root`` that verifies as (directory, marker) or None, the newer ones
    rejected on the way), logging each rejected one and why.

    Raises :class:`CheckpointError` when ``step_*`` directories exist but none verifies; callers decide
    whether to start from scratch instead."""
    candidates = sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []
    rejected: list[Path] = []
    reasons = []
    for directory in candidates:
        marker, reason = verify(directory)
        if marker is not None:
            return (directory, marker), rejected
        log.warning("rejected checkpoint %s: %s", directory.name, reason)
        rejected.append(directory)
        reasons.append(f"{directory.name}: {reason}")
    if rejected:
        raise CheckpointError(f"no checkpoint in {root} verifies; refusing to start from scratch over them:\n  "
                              + "\n  ".join(reasons) + f"\nset {RESTART_KEY}=true to train from step 0 anyway "
                              f"(the rejected checkpoints are then moved to {root / REJECTED_DIR})")
    return None, []


def _set_aside(directories: list[Path]) -> None:
    """Move rejected checkpoints out of the resume walk and of pruning: committed ones to ``rejected/``
    (kept for inspection), those that never committed are deleted."""
    for directory in directories:
        if not (directory / COMMIT_FILE).exists():
            shutil.rmtree(directory, ignore_errors=True)
            continue
        target = directory.parent / REJECTED_DIR / f"{directory.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(exist_ok=True)
        directory.rename(target)
        log.warning("moved rejected checkpoint %s to %s", directory.name, target)


def select_checkpoint(root: Path, allow_restart: bool) -> tuple[Path, dict] | None:
    """Every rank: the checkpoint to resume from, chosen by rank 0 (:func:`find_resumable`) — a collective.

    Rejected checkpoints are set aside (:func:`_set_aside`). With ``allow_restart`` a run whose
    checkpoints all fail verification starts from step 0 (logged)."""
    choice = error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            found, rejected = find_resumable(root)
            choice = found[0].name if found else None
            _set_aside(rejected)
        except CheckpointError as e:
            if not allow_restart:
                error = str(e)
            else:
                log.warning("%s=true: no checkpoint verifies, training from step 0", RESTART_KEY)
                _set_aside(sorted(root.glob("step_*")))
    choice, error = _from_rank0((choice, error))
    _raise_if(error)
    if choice is None:
        return None
    directory = root / choice
    return directory, json.loads((directory / COMMIT_FILE).read_text())


def load_checkpoint(engine, directory: Path, marker: dict, rank: int) -> tuple[dict, dict]:
    """Load DeepSpeed state (model, optimizer) and this rank's own state from a checkpoint that verified
    → (client_state, rank_state). Every file is hash-checked again as it is read, then loaded safely."""
    expected = {str((directory / name).absolute()): entry["sha256"] for name, entry in marker["files"].items()}
    hashing = _hashing_engine(engine)
    hashing.expected = expected
    try:
        _, client_state = engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                 load_optimizer_states=True, load_lr_scheduler_states=False)
    except CheckpointError:
        raise
    except Exception as e:  # a file that verified but does not fit this engine (names the checkpoint)
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory}: {type(e).__name__}: {e}") from e
    finally:
        hashing.expected = {}
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory}")
    rank_file = directory / f"ltdist_rank{rank}.pt"
    if str(rank_file.absolute()) not in expected:
        raise CheckpointError(f"{rank_file} is not in the checkpoint: it was written by a job with fewer ranks")
    return client_state, safe_load(rank_file, expected[str(rank_file.absolute())])
