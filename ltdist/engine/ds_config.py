"""Our config → the DeepSpeed config dict, the per-rank micro-batch and the effective learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCALING = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples split: global = micro · world · accum."""

    global_batch: int
    micro_batch: int  # per rank, per forward/backward
    world_size: int
    grad_accum: int


def plan_batches(global_batch: int, world_size: int, grad_accum: int) -> BatchPlan:
    if global_batch < 1 or world_size < 1 or grad_accum < 1:
        raise ValueError(f"trainer.batch_size ({global_batch}), world size ({world_size}) and trainer.grad_accum "
                         f"({grad_accum}) must all be >= 1")
    if global_batch % (world_size * grad_accum):
        raise ValueError(f"trainer.batch_size={global_batch} (global) is not divisible by world_size·grad_accum = "
                         f"{world_size}·{grad_accum}; pick a multiple of {world_size * grad_accum}")
    return BatchPlan(global_batch, global_batch // (world_size * grad_accum), world_size, grad_accum)


def effective_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """Base LR (defined at ``reference_batch``) scaled to the global batch: linear, square root, or none."""
    if rule not in LR_SCALING:
        raise ValueError(f"optim.lr_scaling must be one of {LR_SCALING}, got {rule!r}")
    ratio = global_batch / reference_batch
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def build_deepspeed_config(plan: BatchPlan, precision: str, zero_stage: int, grad_clip: float,
                           extra: dict | None = None) -> dict:
    """The dict passed to ``deepspeed.initialize``; ``extra`` (raw DeepSpeed keys) is merged last."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {PRECISIONS}, got {precision!r}")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {zero_stage}")
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        # Our optimizer is torch SGD; DeepSpeed only certifies its own optimizers under ZeRO.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def skip_single_rank_allreduce(engine) -> bool:
    """Turn off DeepSpeed's gradient all-reduce when there is nothing to reduce; return whether it did.

    Without ZeRO, ``engine.backward`` flattens every gradient into one buffer, scales it by 1/world size,
    all-reduces it and copies it back, also with a single rank, where all that is the identity. ZeRO
    optimizers do their bookkeeping in that reduction, so they keep it.
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if engine.dp_world_size != 1 or isinstance(engine.optimizer, ZeROOptimizer):
        return False
    engine.enable_backward_allreduce = False
    return True
