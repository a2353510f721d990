"""The GPU check's pipeline part: every stage of ltdist end to end on one device, each stage's result checked.

Synthetic iNaturalist-shaped shards (:mod:`ltdist.data.formats.synthetic`, written by ``ltdist shards
synthetic`` on all CPUs), then two local launches (``ltdist.launch --cluster local``):

- run ``ce``: ``train`` (cross-entropy, the cosine head whose logits are the Triton kernel on CUDA, bf16,
  DeepSpeed ZeRO-1), ``extract``, ``kt`` (Triton KT attention), ``mpfa`` (the CUDA sampler), ``evaluate``;
- run ``mpcl``: ``train`` with ``method.loss=mpcl`` and the meta step on from the first step (the virtual SGD
  step's double backward goes through the reference ops on CUDA).

Checks: every logged training loss finite, the last logged loss below the first, the MPCL run made meta
steps, ``report.json`` written, and every classifier's top-1 over all test images above chance by three
binomial standard deviations (the synthetic classes are learnable). ``SIZES`` holds the GPU sizes and the
CPU dry run's tiny ones.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Size:
    classes: int
    train_images: int
    imbalance: float  # n_max / n_min of the synthetic profile (n_max is 1000)
    test_per_class: int
    val_per_class: int
    image_size: int
    arch: str
    batch: int
    steps: int  # optimizer steps of the CE run
    mpcl_steps: int
    workers: int  # loader workers per rank
    log_every: int


SIZES = {
    # ~4 000 train images of 224 px over 200 classes; 100 steps of 128 images is about three epochs.
    "gpu": Size(classes=200, train_images=4000, imbalance=500, test_per_class=5, val_per_class=5, image_size=224,
                arch="resnet50", batch=128, steps=100, mpcl_steps=10, workers=10, log_every=10),
    # The same stages at a size two CPU cores run in well under a minute.
    "dry-run": Size(classes=6, train_images=1200, imbalance=100, test_per_class=10, val_per_class=4,
                    image_size=16, arch="resnet8", batch=32, steps=12, mpcl_steps=3, workers=1, log_every=2),
}


def _run(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` with its output in ``log``; RuntimeError with the log's tail when it fails."""
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{' '.join(cmd[:6])} ... ran past {timeout:.0f} s (see {log})") from e
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode} (see {log}):\n{tail}")


def launch_overrides(size: Size, shards: Path, root: Path, device: str) -> list[str]:
    """The overrides both runs share: data, model, bf16 + ZeRO-1, one rank on ``device``."""
    return [f"data.shards={shards}", "data.format=synthetic", "data.name=synthetic",
            f"data.image_size={size.image_size}", "data.channels=3", f"data.num_workers={size.workers}",
            f"data.val_per_class={size.val_per_class}",
            f"model.arch={size.arch}", "model.classifier=cosine", "trainer.precision=bf16", "deepspeed.zero_stage=1",
            f"trainer.device={device}", f"trainer.batch_size={size.batch}", f"trainer.log_every={size.log_every}",
            "trainer.checkpoint_every=100000", "trainer.progress=false", "optim.warmup_epochs=0.1",
            "launch.tasks_per_node=1", f"launch.gpus_per_node={1 if device == 'cuda' else 0}",
            f"launch.cpus_per_task={max(1, size.workers)}", f"output.root={root}", "experiment=gpu_check"]


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """The per-window training lines of ``metrics.jsonl`` (no events)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == "train" and "loss" in r and "event" not in r]


def check_training(records: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Loss finite everywhere and falling (last window below the first); figures of the run."""
    if not records:
        raise AssertionError("metrics.jsonl holds no training line")
    losses = [r["loss"] for r in records]
    if not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"non-finite training loss: {losses}")
    if records[-1]["step"] != steps:
        raise AssertionError(f"training stopped at step {records[-1]['step']}, not {steps}")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"the training loss did not fall: {losses}")
    later = records[len(records) // 2:]  # past start-up (cudnn autotuning, the loader filling up)
    return dict(first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4), steps=records[-1]["step"],
                images_per_s=round(sum(r["images_per_s"] for r in later) / len(later), 1),
                data_wait_fraction=round(sum(r["data_wait_fraction"] for r in later) / len(later), 3),
                skipped_steps=records[-1].get("skipped_steps", 0))


def check_report(report: dict[str, Any], classes: int, test_images: int) -> dict[str, Any]:
    """Every classifier's top-1 (all classes, a fraction) above chance + 3 binomial standard deviations."""
    from ltdist.stages.mpfa import ROWS

    chance = 1.0 / classes
    floor = chance + 3 * math.sqrt(chance * (1 - chance) / test_images)
    scores = {name: round(s["all"], 4) for name, s in report["classifiers"].items()}
    if not {"cosine", "ensemble"} <= set(scores) or not set(ROWS.values()) & set(scores):
        raise AssertionError(f"report.json lacks the cosine head, the KT ensemble or an MPFA row: {sorted(scores)}")
    low = {name: v for name, v in scores.items() if not v > floor}
    if low:
        raise AssertionError(f"top-1 at or below {floor:.4f} (chance {chance:.4f} + 3 sd): {low}")
    return dict(top1_all=scores, above=round(floor, 4))


def run(out: Path, mode: str, device: str, deadline: float) -> dict[str, Any]:
    """Shards, the CE run and the MPCL run under ``out``, all before ``deadline`` (``time.monotonic``)."""
    size = SIZES[mode]
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    figures: dict[str, Any] = dict(size=asdict(size), seconds={})

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining < 5:
            raise TimeoutError("no time left for the next stage")
        return remaining

    shards, root = out / "shards", out / "runs"
    t0 = time.monotonic()
    if not (shards / "index.json").exists():
        _run([*py, "ltdist.cli", "shards", "synthetic", "--out", str(shards), "--classes", str(size.classes),
              "--train-images", str(size.train_images), "--imbalance", str(size.imbalance),
              "--val-per-class", str(size.val_per_class), "--test-per-class", str(size.test_per_class),
              "--image-size", str(size.image_size), "--shard-size", "250", "--workers", str(os.cpu_count() or 1),
              "--no-progress"], out / "shards.log", left(), env)
    figures["seconds"]["shards"] = round(time.monotonic() - t0, 1)
    common = launch_overrides(size, shards, root, device)
    launch = [*py, "ltdist.launch", "--cluster", "local"]

    t0 = time.monotonic()
    _run([*launch, *common, "output.run_id=ce", "stages=[train,extract,kt,mpfa,evaluate]",
          f"trainer.max_steps={size.steps}", f"trainer.epochs={size.steps}", "method.mpfa.epochs=2",
          "method.mpfa.baseline_row=false"], out / "ce.log", left(), env)
    figures["seconds"]["ce_run"] = round(time.monotonic() - t0, 1)
    ce_dir = root / "gpu_check" / "ce"
    figures["train"] = check_training(train_records(ce_dir), size.steps)
    report = json.loads((ce_dir / "report.json").read_text())
    figures["evaluate"] = check_report(report, size.classes, size.classes * size.test_per_class)
    for stage in ("kt", "mpfa"):
        if not (ce_dir / "classifiers" / f"{stage}.pt").is_file():
            raise AssertionError(f"{ce_dir}/classifiers/{stage}.pt was not written")

    t0 = time.monotonic()
    _run([*launch, *common, "output.run_id=mpcl", "stages=[train]", "method.loss=mpcl",
          "method.mpcl.warmup_epochs=0", "method.mpcl.meta_network=true", "method.mpcl.meta_source=val",
          f"method.mpcl.meta_per_class={size.val_per_class}", f"trainer.max_steps={size.mpcl_steps}",
          f"trainer.epochs={size.mpcl_steps}", "trainer.log_every=1"], out / "mpcl.log", left(), env)
    figures["seconds"]["mpcl_run"] = round(time.monotonic() - t0, 1)
    records = train_records(root / "gpu_check" / "mpcl")
    if not records or not all(math.isfinite(r["loss"]) for r in records):
        raise AssertionError(f"MPCL run: no or non-finite losses: {[r.get('loss') for r in records]}")
    meta_steps = records[-1].get("meta_steps", 0)  # the objective's running count
    if meta_steps < size.mpcl_steps:
        raise AssertionError(f"MPCL run: {meta_steps} meta steps in {size.mpcl_steps} optimizer steps")
    figures["mpcl"] = dict(losses=[round(r["loss"], 4) for r in records], meta_steps=int(meta_steps))
    return figures
