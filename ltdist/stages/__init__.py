"""Stages: each is a module ``ltdist.stages.<name>`` with one entry point ``run(ctx) -> None``.

A job runs ``cfg.stages`` in order on every rank. A stage reads what earlier stages left in the
run directory and writes its own outputs there, so any stage can be re-run alone.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ltdist.distributed import DistEnv
from ltdist.engine.metrics import add_scalars, tensorboard_writer

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage gets: the validated config, the run directory and this rank's place in the job."""

    cfg: DictConfig
    run_dir: Path
    dist: DistEnv
    _tensorboard: Any = field(default=None, repr=False)

    def append_metrics(self, record: dict) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0 only; other ranks return). With the
        ``tensorboard`` extra, a later stage's numbers also go to ``tensorboard/`` as ``<stage>/<key>``
        scalars at the record's ``step`` (0 if none); the train stage's own sink writes its records."""
        if not self.dist.is_main:
            return
        record = {"time": time.time(), **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("stage", "train") != "train":
            if self._tensorboard is None:
                self._tensorboard = tensorboard_writer(self.run_dir / "tensorboard", True) or False
            if self._tensorboard:
                add_scalars(self._tensorboard, record, int(record.get("step", 0)), record["stage"])

    def close(self) -> None:
        """Close the TensorBoard writer of the later stages, if one was opened."""
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = None


def run_stages(ctx: StageContext) -> None:
    """Import and run each stage of ``ctx.cfg.stages`` in order."""
    try:
        for name in ctx.cfg.stages:
            module = importlib.import_module(f"ltdist.stages.{name}")
            log.info("rank %d: stage %s starts", ctx.dist.rank, name)
            start = time.perf_counter()
            module.run(ctx)
            log.info("rank %d: stage %s done in %.1f s", ctx.dist.rank, name, time.perf_counter() - start)
    finally:
        ctx.close()
