"""The MPFA classifier retrain: real + generated features, drawn on the fly, on one or several ranks.

An epoch is a seeded permutation of the augmented set — the N real bank rows and the G generated
features of the :class:`ltdist.methods.mpfa.AugmentationPlan` (item t < N is real row t, item
N + g is generated feature g) — cut into global batches of ``batch_size`` items, each batch into blocks
of :data:`BLOCK` positions. Rank r trains on the blocks j ≡ r (mod world size), a disjoint share.

Generated features are never stored beyond a window: the epoch is processed in windows of
``draw_window // batch_size`` batches, and a rank draws the generated items of its share of a window in
one sampler call. The sampler groups the call's draws by class (one GEMM per class term) and writes each
back to its item's position, so the shuffle is kept while the draws run in class order. Generated
feature g of epoch e is stream g of the seed (seed, e): it does not depend on the window, the number
of ranks or the thread count (up to the GEMM's rounding), so 1 and 2 ranks see the same features, and a
restart redraws them. Each rank sums its share's cross-entropy divided by the global batch size; the
gradients are summed across ranks (one all-reduce per step), which gives the mean over the global batch
on every rank.

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
from ltdist.kernels.calibrated_sampler import default_precision
from ltdist.methods.classifier_set import LinearScorer, balanced_accuracy, power_normalise
from ltdist.methods.mpfa import AugmentationPlan, draw_features

log = logging.getLogger(__name__)

BLOCK = 64  # positions of a global batch given to one rank (the unit of work shared out to ranks)
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
    draw_window: int = 65536  # items per window: a rank draws its share of them in one sampler call
    precision: str = "auto"  # sampler GEMM precision: fp32 | tf32 | bf16 | auto (kernels.calibrated_sampler)


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


def epoch_order(plan: AugmentationPlan, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's item order: a permutation [plan.size] int64 of real (< N) and generated (≥ N) items."""
    return torch.randperm(plan.size, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 1)))


def rank_blocks(batch_len: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(start, stop) positions of this rank's blocks in a global batch of ``batch_len`` items."""
    return [(j * BLOCK, min((j + 1) * BLOCK, batch_len))
            for j in range(rank, math.ceil(batch_len / BLOCK), world_size)]


def sampler_precision(settings: RetrainSettings, device: torch.device) -> str:
    return default_precision(device) if settings.precision == "auto" else settings.precision


def item_features(plan: AugmentationPlan, items: torch.Tensor, settings: RetrainSettings,
                  epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, d] (MPFA space) and labels [n] of epoch items [n]; the generated ones in one sampler call
    (generated feature g is stream g of the seed (settings.seed, epoch), whatever call it is drawn in)."""
    items = items.to(plan.bank.device)
    real = items < plan.num_real
    generated = (items - plan.num_real).clamp(min=0)
    rows = torch.where(real, items, plan.source_of(generated))
    features = plan.bank[rows]
    if not bool(real.all()):
        features[~real] = draw_features(plan, rows[~real], alpha=settings.alpha, beta=settings.beta,
                                        beta_form=settings.beta_form, seed=mix_seed(settings.seed, epoch),
                                        streams=generated[~real],
                                        precision=sampler_precision(settings, plan.bank.device))[:, 0]
    return features, plan.labels[rows]


def window_shares(batches: range, batch_size: int, size: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """For each batch of the window: the epoch positions [n_b] of this rank's blocks."""
    shares = []
    for b in batches:
        start = b * batch_size
        blocks = rank_blocks(min(batch_size, size - start), rank, world_size)
        shares.append(torch.cat([torch.arange(start + lo, start + hi) for lo, hi in blocks]) if blocks
                      else torch.zeros(0, dtype=torch.long))
    return shares


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


def train_step(model: RetrainClassifier, optimizer: torch.optim.Optimizer, features: torch.Tensor,
               labels: torch.Tensor, batch_len: int, world_size: int) -> float:
    """One optimizer step on a global batch of ``batch_len`` items of which this rank holds ``features``
    [n, d] and ``labels`` [n] (n may be 0); returns the batch's mean loss (all ranks)."""
    params = list(model.parameters())
    optimizer.zero_grad(set_to_none=False)  # ranks without a block still add zeros to the all-reduce
    local_loss = torch.zeros((), device=features.device)
    if labels.numel():  # one forward/backward over the rank's share
        loss = F.cross_entropy(model(features), labels, reduction="sum") / batch_len
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
    per_window = max(1, settings.draw_window // settings.batch_size)  # batches drawn together
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
        order = epoch_order(plan, settings.seed, epoch)
        start, loss_total = time.perf_counter(), 0.0
        last_log = start
        for w0 in range(0, steps_per_epoch, per_window):
            batches = range(w0, min(w0 + per_window, steps_per_epoch))
            shares = window_shares(batches, settings.batch_size, plan.size, rank, world_size)
            features, labels = item_features(plan, order[torch.cat(shares)], settings, epoch)
            lengths = [share.numel() for share in shares]
            for b, f, y in zip(batches, features.split(lengths), labels.split(lengths)):
                _set_lr(optimizer, settings, epoch * steps_per_epoch + b, total_steps)
                batch_len = min(settings.batch_size, plan.size - b * settings.batch_size)
                loss_total += train_step(model, optimizer, f, y, batch_len, world_size)
            if time.perf_counter() - last_log > PROGRESS_S:  # an iNaturalist-sized epoch takes hours on a CPU
                last_log = time.perf_counter()
                done = batches[-1] + 1
                log.info("mpfa %s: epoch %d step %d/%d loss %.4f, %.0f features/s", name, epoch + 1, done,
                         steps_per_epoch, loss_total / done, done * settings.batch_size / (last_log - start))
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
