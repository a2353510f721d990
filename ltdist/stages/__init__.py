"""Stages: each is a module ``ltdist.stages.<name>`` with one entry point ``run(ctx) -> None``.

A job runs ``cfg.stages`` in order on every rank. A stage reads what earlier stages left in the
run directory and writes its own outputs there, so any stage can be re-run alone.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ltdist.distributed import DistEnv

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage gets: the validated config, the run directory and this rank's place in the job."""

    cfg: DictConfig
    run_dir: Path
    dist: DistEnv

    def append_metrics(self, record: dict) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0 only; other ranks return)."""
        if not self.dist.is_main:
            return
        record = {"time": time.time(), **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def run_stages(ctx: StageContext) -> None:
    """Import and run each stage of ``ctx.cfg.stages`` in order."""
    for name in ctx.cfg.stages:
        module = importlib.import_module(f"ltdist.stages.{name}")
        log.info("rank %d: stage %s starts", ctx.dist.rank, name)
        start = time.perf_counter()
        module.run(ctx)
        log.info("rank %d: stage %s done in %.1f s", ctx.dist.rank, name, time.perf_counter() - start)
