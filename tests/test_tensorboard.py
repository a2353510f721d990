"""TensorBoard event files next to metrics.jsonl: the train sink's and the later stages' scalars, rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ltdist.config.load import load_config
from ltdist.distributed import DistEnv
from ltdist.engine.metrics import MetricsSink
from ltdist.stages import StageContext

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _ctx(run_dir: Path, rank: int) -> StageContext:
    env = DistEnv(rank=rank, world_size=2, local_rank=rank, local_world_size=2, node_rank=0, master_addr="x",
                  master_port=0, backend="gloo", device=torch.device("cpu"), hostname="h")
    return StageContext(load_config(None, []), run_dir, env)


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_and_later_stages_write_scalars_on_rank_0(tmp_path):
    ctx = _ctx(tmp_path, 0)
    sink = MetricsSink(ctx.append_metrics, tmp_path / "tensorboard", True)
    sink.write({"stage": "train", "step": 20, "loss": 1.5, "accuracy": 0.25, "scale": None}, 20)
    sink.close()
    ctx.append_metrics({"stage": "kt", "tau": 10.0, "ks": [0, 20], "untrained_classes": []})
    ctx.append_metrics({"stage": "evaluate", "step": 3, "all": 0.8})
    ctx.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(20, 1.5)] and scalars["train/accuracy"] == [(20, 0.25)]
    assert scalars["kt/tau"] == [(0, 10.0)] and scalars["evaluate/all"] == [(3, pytest.approx(0.8))]
    assert "train/scale" not in scalars
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["train", "kt", "evaluate"]  # metrics.jsonl keeps every record


def test_other_ranks_write_no_event_files(tmp_path):
    ctx = _ctx(tmp_path, 1)
    MetricsSink(ctx.append_metrics, tmp_path / "tensorboard", False).write({"stage": "train", "loss": 1.0}, 1)
    ctx.append_metrics({"stage": "kt", "tau": 10.0})
    ctx.close()
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "metrics.jsonl").exists()
