"""The MPFA classifier retrain: real + generated features, drawn on the fly, on one or several ranks.

An epoch is a seeded permutation of the augmented set — the N real bank rows and the G generated
features of the :class:`ltdist.methods.mpfa.AugmentationPlan` (item t < N is real row t, item
N + g is generated feature g) — cut into global batches of ``batch_size`` items. With the balanced
count every class holds N_1 items, so a uniform shuffle gives class-balanced batches. With
``group_draws`` = R > 1 the shuffled units are the real rows and runs of up to R generated features of
one source, which stay adjacent: a run in a block is drawn as R samples of one request (a GEMM with R
rows per class term instead of a GEMV per feature), at the price of R correlated-source items per batch.

Generated features are never stored: a global batch is split into blocks of :data:`BLOCK` positions
and each block is drawn by one sampler call seeded from (seed, epoch, batch, block). Rank r takes the
blocks j ≡ r (mod world size), a disjoint share. The draws depend on the seed and the position only,
not on the number of ranks, so 1 and 2 ranks see the same features, and a restart redraws them.
Each rank sums its share's cross-entropy divided by the global batch size; the gradients are summed
across ranks (one all-reduce per step), which gives the mean over the global batch on every rank.

The classifier — cosine: s · normalise(x) · normalise(W)ᵀ with a fixed scale s, or linear: x Wᵀ + b,
for x a real feature T(f) or a generated one — is re-initialised from the seed and trained by SGD
with momentum, weight decay and a cosine learning rate decaying to 0 over all steps. After every
epoch rank 0 saves a checkpoint (weights, optimizer state, epoch, a fingerprint of the settings and
the plan); a re-run with the same fingerprint resumes from it and ends with the same classifier as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ltdist.distributed import barrier
from ltdist.fileio import torch_save_atomic
from ltdist.methods.classifier_set import LinearScorer, balanced_accuracy, power_normalise
from ltdist.methods.mpfa import AugmentationPlan, draw_features

log = logging.getLogger(__name__)

BLOCK = 64  # positions of a global batch drawn by one sampler call (the unit of work shared out to ranks)
PROGRESS_S = 60.0  # seconds between progress lines within an epoch
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class RetrainSettings:
    """The retrain's knobs (``method.mpfa.*``); ``tukey`` is the space's power, ``seed`` ``trainer.seed``."""

    classifier: str
    scale: float
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    alpha: float
    beta: float
    beta_form: str
    tukey: float
    seed: int
    group_draws: int = 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): distinct tuples give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def epoch_order(plan: AugmentationPlan, seed: int, epoch: int, group: int = 1) -> torch.Tensor:
    """The epoch's item order: a permutation [plan.size] int64 of real (< N) and generated (≥ N) items.

    The shuffled units are the real rows and groups of up to ``group`` consecutive generated features
    of one source, which stay adjacent (``group = 1``: every item is placed independently)."""
    per_source = plan.per_source.cpu()
    groups = (per_source + group - 1) // group  # per source
    source = torch.repeat_interleave(torch.arange(plan.num_real), groups)
    k = torch.arange(source.numel()) - torch.repeat_interleave(torch.cumsum(groups, 0) - groups, groups)
    first = plan.cumulative.cpu() - per_source  # first generated id of each source
    starts = torch.cat([torch.arange(plan.num_real), plan.num_real + first[source] + k * group])
    lengths = torch.cat([torch.ones(plan.num_real, dtype=torch.long),
                         torch.clamp(per_source[source] - k * group, max=group)])
    perm = torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 1)))
    starts, lengths = starts[perm], lengths[perm]
    within = torch.arange(plan.size) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.repeat_interleave(starts, lengths) + within


def rank_blocks(batch_len: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(start, stop) positions of this rank's blocks in a global batch of ``batch_len`` items."""
    return [(j * BLOCK, min((j + 1) * BLOCK, batch_len))
            for j in range(rank, math.ceil(batch_len / BLOCK), world_size)]


def block_features(plan: AugmentationPlan, items: torch.Tensor, settings: RetrainSettings,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, d] (MPFA space) and labels [n] of the items [n] of one block, drawn with ``seed``."""
    items = items.to(plan.bank.device)
    real = items < plan.num_real
    rows = torch.where(real, items, plan.source_of((items - plan.num_real).clamp(min=0)))
    features = plan.bank[rows]
    if not bool(real.all()):
        features[~real] = _draw_runs(plan, rows[~real], settings, seed)
    return features, plan.labels[rows]


def _draw_runs(plan: AugmentationPlan, sources: torch.Tensor, settings: RetrainSettings,
               seed: int) -> torch.Tensor:
    """One feature per entry of ``sources`` [S]: adjacent equal sources (a run) are drawn together,
    one sampler call per run length (seeded from ``seed`` and the length) → [S, d]."""
    new_run = torch.ones_like(sources, dtype=torch.bool)
    new_run[1:] = sources[1:] != sources[:-1]
    run_start = new_run.nonzero().flatten()
    run_length = torch.diff(run_start, append=torch.tensor([sources.numel()], device=sources.device))
    out = torch.empty(sources.numel(), plan.bank.shape[1], device=plan.bank.device)
    for length in torch.unique(run_length).tolist():
        runs = run_start[run_length == length]
        drawn = draw_features(plan, sources[runs], alpha=settings.alpha, beta=settings.beta,
                              beta_form=settings.beta_form, seed=mix_seed(seed, length), draws=length)
        out[(runs[:, None] + torch.arange(length, device=runs.device)).flatten()] = drawn.flatten(0, 1)
    return out


def fingerprint(plan: AugmentationPlan, settings: RetrainSettings) -> dict:
    """What a checkpoint must match to be resumed: the settings and a summary of the plan."""
    return {**asdict(settings), "num_real": plan.num_real, "generated": plan.generated,
            "shape": list(plan.bank.shape), "centres_sum": float(plan.centres.double().sum()),
            "weights_sum": float(plan.weights.double().sum())}


class RetrainClassifier(torch.nn.Module):
    """The classifier being retrained: re-initialised from ``settings.seed``, weight [C, d] (and bias [C])."""

    def __init__(self, num_classes: int, dim: int, settings: RetrainSettings):
        super().__init__()
        gen = torch.Generator().manual_seed(mix_seed(settings.seed, 2))
        self.kind, self.scale = settings.classifier, settings.scale
        self.weight = torch.nn.Parameter(torch.randn(num_classes, dim, generator=gen) / dim**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(num_classes)) if self.kind == "linear" else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, d] in the MPFA space (real ones are unit rows, generated ones are not) → logits [n, C]."""
        if self.kind == "cosine":
            return self.scale * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T
        return features @ self.weight.T + self.bias

    def scorer(self, feature_power: float) -> LinearScorer:
        bias = None if self.bias is None else self.bias.detach().cpu().clone()
        return LinearScorer(self.kind, self.weight.detach().cpu().clone(), bias, scale=self.scale,
                            feature_power=feature_power)


def _all_reduce_(flat: torch.Tensor, world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(flat)


def _set_lr(optimizer: torch.optim.Optimizer, settings: RetrainSettings, step: int, total_steps: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 0.5 * settings.lr * (1 + math.cos(math.pi * step / total_steps))


def make_optimizer(model: RetrainClassifier, settings: RetrainSettings) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def train_step(model: RetrainClassifier, optimizer: torch.optim.Optimizer, plan: AugmentationPlan,
               settings: RetrainSettings, items: torch.Tensor, epoch: int, batch: int, rank: int,
               world_size: int) -> float:
    """One optimizer step on the global batch ``items`` [B] (this rank draws and trains its blocks);
    returns the batch's mean loss (all ranks)."""
    params = list(model.parameters())
    optimizer.zero_grad(set_to_none=False)  # ranks without a block still add zeros to the all-reduce
    local_loss = torch.zeros((), device=plan.bank.device)
    blocks = [block_features(plan, items[lo:hi], settings, mix_seed(settings.seed, epoch, batch, lo // BLOCK))
              for lo, hi in rank_blocks(items.numel(), rank, world_size)]
    if blocks:  # one forward/backward over the rank's share
        features, labels = (torch.cat(parts) for parts in zip(*blocks))
        loss = F.cross_entropy(model(features), labels, reduction="sum") / items.numel()
        loss.backward()
        local_loss += loss.detach()
    flat = torch.cat([*(p.grad.flatten() for p in params), local_loss[None]])
    _all_reduce_(flat, world_size)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    optimizer.step()
    return float(flat[-1])


def retrain(plan: AugmentationPlan, settings: RetrainSettings, *, rank: int = 0, world_size: int = 1,
            val: dict | None = None, checkpoint: Path | None = None, name: str = "mpfa") -> LinearScorer:
    """Train a fresh classifier on the plan's real + generated features; return it as a scorer.

    Args:
        plan: the augmentation plan (its bank's device is where everything runs).
        settings: the retrain's knobs.
        rank, world_size: this process's share (collectives only when a process group exists).
        val: a val feature dict (raw ``features`` [V, F], ``labels`` [V]) for the per-epoch log, or None.
        checkpoint: the resumable per-epoch state (written by rank 0, read by every rank), or None.
        name: the row's name in log lines.
    Returns:
        a :class:`LinearScorer` with ``feature_power = settings.tukey`` (it scores raw features).
    """
    device = plan.bank.device
    model = RetrainClassifier(plan.num_classes, plan.bank.shape[1], settings).to(device)
    optimizer = make_optimizer(model, settings)
    steps_per_epoch = math.ceil(plan.size / settings.batch_size)
    if math.ceil(settings.batch_size / BLOCK) < world_size:
        log.warning("mpfa %s: a batch of %d holds %d blocks of %d for %d ranks: some ranks idle (raise "
                    "method.mpfa.batch_size)", name, settings.batch_size, math.ceil(settings.batch_size / BLOCK),
                    BLOCK, world_size)
    total_steps = settings.epochs * steps_per_epoch
    expected = fingerprint(plan, settings)
    start_epoch = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["fingerprint"] == expected:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch = state["epoch"]
            log.info("mpfa %s: resuming from %s after epoch %d", name, checkpoint, start_epoch)
        else:
            log.warning("mpfa %s: ignoring %s (written with other settings or inputs)", name, checkpoint)
    val_features = None if val is None else power_normalise(val["features"].to(device), settings.tukey)
    for epoch in range(start_epoch, settings.epochs):
        order = epoch_order(plan, settings.seed, epoch, settings.group_draws)
        start, loss_total = time.perf_counter(), 0.0
        last_log = start
        for b in range(steps_per_epoch):
            items = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            _set_lr(optimizer, settings, epoch * steps_per_epoch + b, total_steps)
            loss_total += train_step(model, optimizer, plan, settings, items, epoch, b, rank, world_size)
            if time.perf_counter() - last_log > PROGRESS_S:  # an iNaturalist-sized epoch takes hours on a CPU
                last_log = time.perf_counter()
                log.info("mpfa %s: epoch %d step %d/%d loss %.4f, %.0f features/s", name, epoch + 1, b + 1,
                         steps_per_epoch, loss_total / (b + 1), (b + 1) * settings.batch_size / (last_log - start))
        elapsed = time.perf_counter() - start
        accuracy = ""
        if val_features is not None:
            with torch.no_grad():
                top1 = balanced_accuracy(model(val_features).cpu(), val["labels"], plan.num_classes)
            accuracy = f", val mean per-class top-1 {100 * top1:.1f} %"
        log.info("mpfa %s: epoch %d/%d loss %.4f%s, %.0f features/s", name, epoch + 1, settings.epochs,
                 loss_total / steps_per_epoch, accuracy, plan.size / elapsed)
        if checkpoint is not None:
            if rank == 0:
                torch_save_atomic({"fingerprint": expected, "epoch": epoch + 1, "model": model.state_dict(),
                                   "optimizer": optimizer.state_dict()}, checkpoint)
            barrier()
    return model.scorer(settings.tukey)
