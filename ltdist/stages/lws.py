"""The ``lws`` stage: learnable weight scaling of the frozen stage-1 head (``method.lws``) → ``classifiers/lws.pt``.

See :func:`ltdist.methods.decoupling.build_lws`; the seed is ``trainer.seed``.
"""

from __future__ import annotations

from ltdist.methods.classifier_set import run_on_rank0
from ltdist.methods.decoupling import build_lws
from ltdist.stages import StageContext


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    run_on_rank0(ctx, "lws", lambda inputs: build_lws(inputs, cfg.method.lws, cfg.trainer.seed, ctx.dist.device))
