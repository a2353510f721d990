"""The ``tau_norm`` stage: the stage-1 head's rows w_i / ‖w_i‖^τ, τ chosen on val (``method.tau_norm``).

Writes ``classifiers/tau_norm.pt``; see :func:`ltdist.methods.decoupling.build_tau_norm`.
"""

from __future__ import annotations

from ltdist.methods.classifier_set import run_on_rank0
from ltdist.methods.decoupling import build_tau_norm
from ltdist.stages import StageContext


def run(ctx: StageContext) -> None:
    run_on_rank0(ctx, "tau_norm", lambda inputs: build_tau_norm(inputs, ctx.cfg.method.tau_norm))
