"""Stage-1 trainer: a DeepSpeed engine over the long-tail data stream, resumable and preemption-safe.

One optimizer step = ``grad_accum`` micro-batches per rank. Every micro-step all-reduces
[non-finite flag, loss·n, correct, n], so all ranks skip a non-finite step together and the logged loss
and accuracy are global. Step boundaries are where ranks agree on preemption, save and log.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ltdist.class_groups import class_groups
from ltdist.distributed import DistEnv, barrier
from ltdist.engine import checkpoint as ckpt
from ltdist.engine import requeue_log, speed
from ltdist.engine.ds_config import BatchPlan, build_deepspeed_config, effective_lr, skip_single_rank_allreduce
from ltdist.engine.ds_ops import isolate_torch_extensions
from ltdist.engine.fingerprint import changed_settings, training_settings
from ltdist.engine.fingerprint import refusal as settings_refusal
from ltdist.engine.metrics import MetricsSink, StepWindow, validate
from ltdist.engine.numerics import NonFiniteGuard, nonfinite_parameters
from ltdist.engine.objective import TrainingObjective
from ltdist.engine.progress import TrainProgress
from ltdist.engine.schedule import lr_at
from ltdist.models import LongTailModel, export_model
from ltdist.models.weights import build_configured_model, write_weights_record
from ltdist.preemption import preemption_agreed, requeue_and_exit
from ltdist.rundir import model_path
from ltdist.watchdog import StallWatchdog

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BN parameters, biases and the cosine scale (1-d / 0-d tensors)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


class Trainer:
    """Builds model + DeepSpeed engine from ``cfg``; :meth:`fit` trains, checkpoints and exports.

    ``stream``: per-rank micro-batches (``set_epoch``, ``batches_per_epoch``, iteration, state dicts).
    ``val_batches``: returns a fresh iterator over the validation split (this rank's share), or None.
    ``plan``: the batch plan the stream's micro-batches were cut by (:func:`ltdist.engine.ds_config.plan_batches`).
    ``make_objective(feature_dim=, dtype=)``: builds the training objective once the model exists; the loss
    and any state of the method live there (``method.loss``: the train stage binds
    :func:`ltdist.methods.objectives.build_objective` to the run's data).
    ``on_batch(step, batch)`` / ``loss_hook(step, loss) -> loss``: observation and fault injection (tests).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, stream, num_classes: int,
                 train_counts: list[int], val_batches: Callable[[], Iterable] | None,
                 append_metrics: Callable[[dict], None], *, plan: BatchPlan,
                 make_objective: Callable[..., TrainingObjective], on_batch: Callable | None = None,
                 loss_hook: Callable | None = None, keep_checkpoints: int = 2):
        self.cfg, self.run_dir, self.env, self.stream = cfg, Path(run_dir), env, stream
        self.val_batches, self.on_batch, self.loss_hook = val_batches, on_batch, loss_hook
        self.keep_checkpoints = keep_checkpoints
        self.ckpt_root = self.run_dir / "checkpoints"
        t, o = cfg.trainer, cfg.optim
        self.plan = plan
        self.num_classes = num_classes
        self.groups = class_groups(train_counts, cfg.evaluate.many_threshold, cfg.evaluate.few_threshold)
        self.dtype = DTYPES[t.precision]

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model, weights_source = build_configured_model(cfg.model, num_classes, cfg.data.channels)
        if weights_source is not None and env.is_main:
            write_weights_record(self.run_dir / "weights", weights_source)
        speed.set_backend_flags(t.cudnn_benchmark, t.tf32)
        self.memory_format = speed.memory_format(t.memory_format, env.device)
        if t.compile:
            speed.compile_backbone(model)
        self.peak_lr = effective_lr(o.lr, self.plan.global_batch, o.lr_reference_batch, o.lr_scaling)
        optimizer = torch.optim.SGD(_param_groups(model, o.weight_decay), lr=self.peak_lr, momentum=o.momentum,
                                    nesterov=o.nesterov)
        self.ds_config = build_deepspeed_config(self.plan, t.precision, cfg.deepspeed.zero_stage, o.grad_clip,
                                                OmegaConf.to_container(cfg.deepspeed.extra, resolve=True))
        isolate_torch_extensions()  # a lock left by a killed rank in a shared extension cache cannot stop us
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config, dist_init_required=False)
        skip_single_rank_allreduce(self.engine)
        if self.dtype != torch.float32 and env.device.type == "cpu":
            # DeepSpeed casts parameters only; CPU batch_norm wants its running statistics in the same dtype.
            for buffer in self.engine.module.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(self.dtype)
        self.objective = make_objective(feature_dim=model.feature_dim, dtype=self.dtype)
        self.steps_per_epoch = stream.batches_per_epoch // self.plan.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"the data stream has {stream.batches_per_epoch} micro-batches per epoch, fewer than "
                             f"trainer.grad_accum={self.plan.grad_accum}: lower trainer.batch_size")
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps > 0 else total
        self.warmup_steps = round(o.warmup_epochs * self.steps_per_epoch)
        self.guard = NonFiniteGuard(t.max_nonfinite_steps)
        self.sink = MetricsSink(append_metrics, self.run_dir / "tensorboard", env.is_main)
        self.step = self.epoch = self.consumed_in_epoch = 0
        self.micro_in_window = 0
        self._stream_state: dict | None = None
        self._last_saved_step = -1
        self.stall = StallWatchdog(0.0, self.run_dir / "heartbeats", env.rank, env.world_size)  # armed by fit()

    @property
    def model(self) -> LongTailModel:
        return self.engine.module

    # ---- checkpoints -------------------------------------------------------------------------------
    def _resume(self) -> None:
        found = ckpt.select_checkpoint(self.ckpt_root, self.cfg.trainer.allow_restart_from_scratch)
        if found is None:
            return
        directory, marker = found
        changes = changed_settings(marker.get("settings", {}), training_settings(self.cfg, self.env.world_size),
                                   list(self.cfg.trainer.accept_changed_keys))
        if changes:
            raise ckpt.CheckpointError(settings_refusal(str(directory), changes))
        client, mine = ckpt.load_checkpoint(self.engine, directory, marker, self.env.rank)
        self.step, self.epoch, self.consumed_in_epoch = client["step"], client["epoch"], client["consumed_in_epoch"]
        self.guard.load_state_dict(client["guard"])
        self.objective.load_state_dict(client.get("objective", {"name": "ce"}))
        self._stream_state = mine["stream"]
        ckpt.set_rng_state(mine["rng"])
        self._last_saved_step = self.step
        self.guard.last_checkpoint = f"{directory} (step {self.step})"
        log.info("rank %d: resumed from %s (step %d, epoch %d, batch %d of the epoch)", self.env.rank,
                 directory, self.step, self.epoch, self.consumed_in_epoch)

    def save(self) -> None:
        """Save on all ranks (collective); refuses to write non-finite weights."""
        self.stall.tick("saving a checkpoint", self.step)
        bad = nonfinite_parameters(self.model)
        if _all_reduce_sum(torch.tensor([float(len(bad))])).item() > 0:
            where = bad[:5] or "another rank's weights"
            raise RuntimeError(f"refusing to checkpoint step {self.step}: non-finite values in {where}")
        client = {"step": self.step, "epoch": self.epoch, "consumed_in_epoch": self.consumed_in_epoch,
                  "guard": self.guard.state_dict(), "objective": self.objective.state_dict()}
        mine = {"stream": self.stream.state_dict() if self.consumed_in_epoch else None, "rng": ckpt.rng_state()}
        directory = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step, client, mine, self.env.rank,
                                         self.keep_checkpoints, training_settings(self.cfg, self.env.world_size))
        self._last_saved_step = self.step
        self.guard.last_checkpoint = f"{directory} (step {self.step})"

    def _preempt(self, started_as_requeue: bool, start_step: int) -> None:
        requeue_log.check_progress(started_as_requeue, start_step, self.step)
        if self.step != self._last_saved_step and self.step > start_step:
            self.save()
        if self.env.is_main:
            requeue_log.append_event(self.ckpt_root, "preempted", self.step)
        self.sink.write({"stage": "train", "event": "preempted", "step": self.step}, self.step)
        self.stall.close()  # the ranks now wait to be stopped by the requeue
        requeue_and_exit(self.env.rank)

    # ---- one micro-step ----------------------------------------------------------------------------
    def _micro_step(self, batch, window: StepWindow) -> None:
        if self.on_batch is not None:
            self.on_batch(self.step, batch)
        device = self.env.device
        images = batch.images.to(device, self.dtype, non_blocking=True, memory_format=self.memory_format)
        labels = batch.labels.to(device, non_blocking=True)
        lr = lr_at(self.step, self.peak_lr, self.total_steps, self.warmup_steps, self.cfg.optim.schedule)
        self.objective.before_micro_step(self.model, images, labels, step=self.step, epoch=self.epoch, lr=lr)
        logits, features = self.engine(images, return_features=True)
        loss = self.objective.loss(features, logits.float(), labels, self.epoch)
        if self.loss_hook is not None:
            loss = self.loss_hook(self.step, loss)
        finite = bool(torch.isfinite(loss))
        correct = (logits.detach().argmax(1) == labels).sum().float()
        stats = torch.stack([torch.tensor(0.0 if finite else 1.0, device=device),
                             loss.detach() * labels.numel() if finite else torch.zeros((), device=device),
                             correct, torch.tensor(float(labels.numel()), device=device)]).cpu()
        stats = _all_reduce_sum(stats)
        agreed_finite = stats[0].item() == 0
        self.guard.record(agreed_finite, self.step)
        if not agreed_finite:  # every rank skips this micro-step: no backward, the engine never sees it
            return
        window.add(stats[1].item(), stats[2].item(), stats[3].item())
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.engine.backward(loss)
        self.engine.step()
        self.objective.after_micro_step(features.detach(), labels)
        self.micro_in_window = 0 if boundary else self.micro_in_window + 1
        if boundary:
            self.step += 1

    def _log_step(self, window: StepWindow) -> None:
        scale = getattr(self.model.classifier, "scale", None)
        record = {"stage": "train", "step": self.step, "epoch": self.epoch,
                  "lr": self.optimizer.param_groups[0]["lr"], **window.summary(),
                  "scale": float(scale.detach()) if scale is not None else None, "skipped_steps": self.guard.skipped,
                  **self.objective.metrics()}
        self.sink.write(record, self.step)
        self.progress.log_step(record, window)
        window.reset()

    def _data_skips(self) -> dict[str, int]:
        """Samples the stream skipped so far (corrupt, invalid) over all ranks, by reason (a collective);
        rank 0 records them in metrics.jsonl (``event: data_skips``), the evaluate report shows them."""
        mine = dict(getattr(self.stream, "skip_counts", {}))  # a stream that cannot skip reports none
        everyone: list = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        total: dict[str, int] = {}
        for counts in everyone:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + int(n)
        self.sink.write({"stage": "train", "event": "data_skips", "step": self.step, "epoch": self.epoch,
                         "data_skips": sum(total.values()), "by_reason": total}, self.step)
        return total

    def _validate(self) -> dict | None:
        self.stall.tick("validating", self.step)
        if self.val_batches is None:
            return None
        accuracy = validate(self.model, self.val_batches(), self.groups, self.num_classes, self.env.device,
                            self.dtype)
        self.sink.write({"stage": "train", "event": "val", "step": self.step, "epoch": self.epoch,
                         **{f"val_{k}": v for k, v in accuracy.items()}}, self.step)
        return accuracy

    def _fp32_master_weights(self) -> dict[str, torch.Tensor]:
        """The optimizer's fp32 copies of bf16/fp16 parameters, gathered over ranks (a collective);
        empty in fp32, where the module's parameters are the master weights."""
        if self.dtype == torch.float32:
            return {}
        # ZeRO 1/2 map each parameter to its fp32 shard (_hp_mapping); ZeRO 0 keeps aligned fp32 groups.
        unfused = {id(p16): p32 for g16, g32 in zip(getattr(self.optimizer, "fp16_groups", []),
                                                    getattr(self.optimizer, "fp32_groups", []))
                   for p16, p32 in zip(g16, g32)}
        master = {}
        for name, param in self.model.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is None:
                full = unfused.get(id(param))
            if full is None:
                raise RuntimeError(f"no fp32 master copy of {name} in {type(self.optimizer).__name__}")
            master[name] = full.detach().float().cpu()
        return master

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self) -> LongTailModel:
        """Resume from the newest verified checkpoint, train to the end, export ``weights/final.pt``.

        A rank without progress for ``trainer.stall_timeout_s`` fails the job (:class:`StallWatchdog`)."""
        self.stall = StallWatchdog(self.cfg.trainer.stall_timeout_s, self.run_dir / "heartbeats", self.env.rank,
                                   self.env.world_size)
        try:
            return self._fit()
        finally:
            self.stall.close()

    def _fit(self) -> LongTailModel:
        self.stall.tick("resuming (rank 0 verifies the checkpoints, every rank loads one)", self.step)
        self._resume()
        start_step = self.step
        started_as_requeue = requeue_log.is_requeue(requeue_log.read_events(self.ckpt_root))
        barrier()  # everyone has read the log before rank 0 appends to it
        if self.env.is_main:
            requeue_log.append_event(self.ckpt_root, "start", self.step)
            self.sink.write({"stage": "train", "event": "config", "global_batch": self.plan.global_batch,
                             "micro_batch": self.plan.micro_batch, "world_size": self.plan.world_size,
                             "grad_accum": self.plan.grad_accum, "base_lr": self.cfg.optim.lr,
                             "lr_scaling": self.cfg.optim.lr_scaling, "lr_reference_batch":
                             self.cfg.optim.lr_reference_batch, "effective_lr": self.peak_lr,
                             "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                             "zero_stage": self.cfg.deepspeed.zero_stage, "precision": self.cfg.trainer.precision,
                             "resumed_from_step": self.step}, self.step)
        interactive = self.cfg.trainer.progress and self.env.is_main and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not interactive, desc="train")
        window = StepWindow()
        self.progress = TrainProgress(self.total_steps, self.cfg.trainer.epochs, self.step, self.env.is_main)
        epoch_micro = self.steps_per_epoch * self.plan.grad_accum
        while self.step < self.total_steps and self.epoch < self.cfg.trainer.epochs:
            self.stream.set_epoch(self.epoch)
            if self._stream_state is not None:
                self.stream.load_state_dict(self._stream_state)
                self._stream_state = None
            batches = iter(self.stream)
            while self.step < self.total_steps:
                at_boundary = self.micro_in_window == 0
                if at_boundary and self.consumed_in_epoch >= epoch_micro:
                    break  # finish the epoch (validation, checkpoint) before acting on a preemption
                if at_boundary and preemption_agreed():
                    self._preempt(started_as_requeue, start_step)
                self.stall.tick("waiting for its next batch from the data stream", self.step)
                waited = time.perf_counter()
                batch = next(batches, None)
                window.data_wait_s += time.perf_counter() - waited
                if batch is None:
                    break
                self.consumed_in_epoch += 1
                before = self.step
                self.stall.tick("in a micro-step (forward, backward, the all-reduces of loss and gradients)",
                                self.step)
                self._micro_step(batch, window)
                if self.step == before:
                    continue
                bar.update(1)
                if self.step % self.cfg.trainer.log_every == 0:
                    self._log_step(window)
                if self.step % self.cfg.trainer.checkpoint_every == 0:
                    self.save()
            if self.consumed_in_epoch >= epoch_micro or self.step < self.total_steps:
                self.epoch, self.consumed_in_epoch = self.epoch + 1, 0  # a full pass (or the stream ran dry)
                self.progress.log_epoch(self.epoch, self.step, window, self._validate(), self._data_skips())
                if self.micro_in_window == 0 and self.step != self._last_saved_step:
                    self.save()
        bar.close()
        if self.consumed_in_epoch:  # stopped inside an epoch (max_steps): validate the final weights too
            self._validate()
            self._data_skips()
        if self.step != self._last_saved_step:
            self.save()
        master = self._fp32_master_weights()
        if self.env.is_main:
            export_model(self.model, model_path(self.run_dir), master)
            self.objective.export(self.run_dir)
        barrier()
        self.sink.close()
        return self.model
