"""The ``crt`` stage: classifier re-training on the frozen features (``method.crt``) → ``classifiers/crt.pt``.

See :func:`ltdist.methods.decoupling.build_crt`; the seed is ``trainer.seed``.
"""

from __future__ import annotations

from ltdist.methods.classifier_set import run_on_rank0
from ltdist.methods.decoupling import build_crt
from ltdist.stages import StageContext


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    run_on_rank0(ctx, "crt", lambda inputs: build_crt(inputs, cfg.method.crt, cfg.trainer.seed, ctx.dist.device))
