"""The ``train`` stage: stage-1 backbone + classifier training with DeepSpeed on the long-tail stream.

Resumes by itself from the newest verified checkpoint in ``<run_dir>/checkpoints`` (requeued jobs run
this same stage again) and ends with plain fp32 weights in ``<run_dir>/weights/final.pt``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ltdist.distributed import barrier
from ltdist.engine.ds_config import plan_batches
from ltdist.engine.ds_ops import stale_locks
from ltdist.engine.trainer import Trainer
from ltdist.methods.objectives import build_meta_set, build_objective
from ltdist.stages import StageContext
from ltdist.stages.kt import val_split_needs
from ltdist.watchdog import watchdog


def build_trainer(ctx: StageContext, on_batch: Callable | None = None, loss_hook: Callable | None = None) -> Trainer:
    """Shards (built by rank 0 when missing), stream, validation split and the :class:`Trainer` for ``ctx``.

    ``on_batch`` / ``loss_hook`` are passed to the Trainer (observation and fault injection in tests).
    """
    from ltdist.data import build_train_stream, ensure_shards, iterate_split, read_index
    from ltdist.data.classes import check_against_data, has_val

    cfg, env = ctx.cfg, ctx.dist
    with watchdog(f"rank {env.rank}: shards in {cfg.data.shards} (rank 0 builds missing ones, the others wait)"):
        if env.is_main:  # one writer builds missing shards; the others wait and then read the index
            ensure_shards(cfg.data)
        barrier()
    index = read_index(ensure_shards(cfg.data))
    plan = plan_batches(cfg.trainer.batch_size, env.world_size, cfg.trainer.grad_accum)
    exclude = check_against_data(cfg, index, val_split_needs(cfg))  # before any engine: bad values stop here, by key
    meta_set = build_meta_set(cfg, index, ctx.run_dir, env.is_main)
    held_out = meta_set.held_out_of_training() if meta_set is not None else {}
    stream = build_train_stream(
        index, batch_size=plan.micro_batch, rank=env.rank, world_size=env.world_size,
        num_workers=cfg.data.num_workers, sampling_power=cfg.sampling.power, seed=cfg.trainer.seed,
        image_size=cfg.data.image_size, channels=cfg.data.channels, shuffle_buffer=cfg.data.shuffle_buffer,
        max_skip_fraction=cfg.data.max_skip_fraction, exclude_classes=tuple(exclude), exclude_keys=held_out)

    def val_batches():
        return iterate_split(index, "val", batch_size=plan.micro_batch, rank=env.rank, world_size=env.world_size,
                             image_size=cfg.data.image_size, channels=cfg.data.channels)

    make_objective = partial(build_objective, cfg, num_classes=index.num_classes, train_counts=index.train_counts,
                             meta_set=meta_set, rank=env.rank, device=env.device)
    with watchdog(f"rank {env.rank}: building the DeepSpeed engine (deepspeed.initialize: op loading, "
                  "parameter broadcast from rank 0)", details=_extension_locks):
        return Trainer(cfg, ctx.run_dir, env, stream, index.num_classes, index.train_counts,
                       val_batches if has_val(index) else None, ctx.append_metrics, plan=plan,
                       make_objective=make_objective, on_batch=on_batch, loss_hook=loss_hook,
                       keep_checkpoints=cfg.trainer.keep_checkpoints)


def _extension_locks() -> str:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    locks = stale_locks(root) if root.name else []
    return f"torch extension locks: {[str(p) for p in locks]}" if locks else "no torch extension lock held"


def run(ctx: StageContext) -> None:
    build_trainer(ctx).fit()
