"""The ``ncm`` stage: nearest class mean over the normalised train features (``method.ncm``).

Writes ``classifiers/ncm.pt``; see :func:`ltdist.methods.decoupling.build_ncm`.
"""

from __future__ import annotations

from ltdist.methods.classifier_set import run_on_rank0
from ltdist.methods.decoupling import build_ncm
from ltdist.stages import StageContext


def run(ctx: StageContext) -> None:
    run_on_rank0(ctx, "ncm", lambda inputs: build_ncm(inputs, ctx.cfg.method.ncm))
