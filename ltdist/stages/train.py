"""The ``train`` stage: stage-1 backbone + classifier training with DeepSpeed on the long-tail stream.

Resumes by itself from the newest verified checkpoint in ``<run_dir>/checkpoints`` (requeued jobs run
this same stage again) and ends with plain fp32 weights in ``<run_dir>/weights/final.pt``.
"""

from __future__ import annotations

from collections.abc import Callable

from ltdist.distributed import barrier
from ltdist.engine.ds_config import plan_batches
from ltdist.engine.trainer import Trainer
from ltdist.methods.kt import excluded_classes
from ltdist.methods.objectives import build_meta_set
from ltdist.stages import StageContext


def build_trainer(ctx: StageContext, on_batch: Callable | None = None, loss_hook: Callable | None = None) -> Trainer:
    """Shards (built by rank 0 when missing), stream, validation split and the :class:`Trainer` for ``ctx``.

    ``on_batch`` / ``loss_hook`` are passed to the Trainer (observation and fault injection in tests).
    """
    from ltdist.data import build_train_stream, ensure_shards, iterate_split, read_index

    cfg, env = ctx.cfg, ctx.dist
    if env.is_main:  # one writer builds missing shards; the others wait and then read the index
        ensure_shards(cfg.data)
    barrier()
    index = read_index(ensure_shards(cfg.data))
    plan = plan_batches(cfg.trainer.batch_size, env.world_size, cfg.trainer.grad_accum)
    exclude = excluded_classes(cfg.data.exclude_from_training, index.train_counts, cfg.evaluate.few_threshold)
    meta_set = build_meta_set(cfg, index, ctx.run_dir, env.is_main)
    held_out = dict(zip(meta_set.keys, meta_set.labels)) if meta_set is not None and meta_set.source == "train" else {}
    stream = build_train_stream(
        index, batch_size=plan.micro_batch, rank=env.rank, world_size=env.world_size,
        num_workers=cfg.data.num_workers, sampling_power=cfg.sampling.power, seed=cfg.trainer.seed,
        image_size=cfg.data.image_size, channels=cfg.data.channels, shuffle_buffer=cfg.data.shuffle_buffer,
        max_skip_fraction=cfg.data.max_skip_fraction, exclude_classes=tuple(exclude), exclude_keys=held_out)

    def val_batches():
        return iterate_split(index, "val", batch_size=plan.micro_batch, rank=env.rank, world_size=env.world_size,
                             image_size=cfg.data.image_size, channels=cfg.data.channels)

    return Trainer(cfg, ctx.run_dir, env, stream, index.num_classes, index.train_counts, val_batches,
                   ctx.append_metrics, on_batch=on_batch, loss_hook=loss_hook,
                   keep_checkpoints=cfg.trainer.keep_checkpoints, meta_set=meta_set)


def run(ctx: StageContext) -> None:
    build_trainer(ctx).fit()
