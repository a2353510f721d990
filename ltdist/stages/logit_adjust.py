"""The ``logit_adjust`` stage: post-hoc logit adjustment of the stage-1 head, τ chosen on val (``method.logit_adjust``).

Writes ``classifiers/logit_adjust.pt``; see :func:`ltdist.methods.decoupling.build_logit_adjust`.
"""

from __future__ import annotations

from ltdist.methods.classifier_set import run_on_rank0
from ltdist.methods.decoupling import build_logit_adjust
from ltdist.stages import StageContext


def run(ctx: StageContext) -> None:
    run_on_rank0(ctx, "logit_adjust", lambda inputs: build_logit_adjust(inputs, ctx.cfg.method.logit_adjust))
