"""Epoch boundaries in one process: per-epoch validation and checkpoints, and a preemption right at an
epoch end resumes to the same weights. The stream is a small in-memory one with the TrainStream protocol
(the 2-rank tests on real shards never reach an epoch end within the test budget)."""

from dataclasses import dataclass
from functools import partial

import pytest
import torch

from ltdist.config.load import load_config
from ltdist.engine.ds_config import plan_batches
from ltdist.engine.trainer import Trainer
from ltdist.methods.objectives import build_objective
from ltdist.preemption import Preempted, install_preemption_handler, request_preemption

COUNTS = [300, 120, 60, 30, 10]  # many, many, medium, medium, few


def plan_and_objective(cfg, env) -> dict:
    """The Trainer's ``plan`` and ``make_objective`` for ``cfg`` on the COUNTS classes, as the train stage
    makes them (no meta set)."""
    return {"plan": plan_batches(cfg.trainer.batch_size, env.world_size, cfg.trainer.grad_accum),
            "make_objective": partial(build_objective, cfg, num_classes=len(COUNTS), train_counts=COUNTS,
                                      meta_set=None, rank=env.rank, device=env.device)}


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    keys: list


class MemoryStream:
    """Deterministic per-epoch permutation of a fixed tensor set; state = (epoch, batches handed out)."""

    def __init__(self, n: int = 96, batch: int = 16):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, len(COUNTS), (n,), generator=g)
        self.images = torch.randn(n, 1, 12, 12, generator=g) + self.labels.view(-1, 1, 1, 1)
        self.batch, self.batches_per_epoch = batch, n // batch
        self.epoch = self.done = 0

    def set_epoch(self, epoch):
        self.epoch, self.done = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state):
        self.epoch, self.done = state["epoch"], state["done"]

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.epoch))
        while self.done < self.batches_per_epoch:
            i = order[self.done * self.batch:(self.done + 1) * self.batch]
            self.done += 1
            yield Batch(self.images[i], self.labels[i], [str(int(k)) for k in i])


def _trainer(run_dir, env, records, grad_accum, extra=()):
    cfg = load_config(None, ["model.arch=resnet8", "trainer.batch_size=16", "trainer.epochs=2",
                             f"trainer.grad_accum={grad_accum}",
                             "trainer.checkpoint_every=1000", "trainer.log_every=2", "optim.warmup_epochs=0.5",
                             "data.channels=1", "trainer.progress=false", *extra])
    stream = MemoryStream(batch=16 // grad_accum)  # the per-rank micro-batch
    return Trainer(cfg, run_dir, env, stream, len(COUNTS), COUNTS, lambda: iter(MemoryStream(32, 8)),
                   records.append, **plan_and_objective(cfg, env))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_epochs_validate_checkpoint_and_resume_at_epoch_end(env, tmp_path, grad_accum):
    records_a: list = []
    _trainer(tmp_path / "A", env, records_a, grad_accum).fit()
    vals = [r for r in records_a if r.get("event") == "val"]
    assert [(v["epoch"], v["step"]) for v in vals] == [(1, 6), (2, 12)]
    assert all(0.0 <= v["val_all"] <= 1.0 and v["val_few"] is not None for v in vals)
    checkpoints = sorted(p.name for p in (tmp_path / "A" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000000006", "step_000000012"]  # the epoch ends (keep = 2)

    records_b: list = []
    install_preemption_handler()
    trainer = _trainer(tmp_path / "B", env, records_b, grad_accum)
    trainer.on_batch = lambda step, batch: request_preemption() if step == 5 else None  # last step of epoch 0
    with pytest.raises(Preempted):
        trainer.fit()
    assert trainer.step == 6 and trainer.epoch == 1 and trainer.consumed_in_epoch == 0
    install_preemption_handler()  # the requeued job: a fresh flag
    resumed = _trainer(tmp_path / "B", env, records_b, grad_accum)
    resumed.fit()
    assert [r["resumed_from_step"] for r in records_b if r.get("event") == "config"] == [0, 6]
    a, b = _trainer_weights(tmp_path / "A"), _trainer_weights(tmp_path / "B")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _trainer_weights(run_dir):
    return torch.load(run_dir / "weights" / "final.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_exports_fp32_master_weights(env, tmp_path, zero_stage):
    records: list = []
    trainer = _trainer(tmp_path / "bf16", env, records, 1,
                       ["trainer.precision=bf16", "trainer.epochs=1", f"deepspeed.zero_stage={zero_stage}"])
    trainer.fit()
    module = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in module.values())
    exported = _trainer_weights(tmp_path / "bf16")
    conv = exported["backbone.conv1.weight"]
    assert conv.dtype == torch.float32
    # the export holds the optimizer's fp32 master copy: close to the bf16 module weights, with the
    # mantissa bits that bf16 drops (a bf16-rounded export would equal its own rounding)
    torch.testing.assert_close(conv.to(torch.bfloat16), module["backbone.conv1.weight"].detach(), rtol=1e-2, atol=1e-2)
    assert not torch.equal(conv.to(torch.bfloat16).float(), conv)
