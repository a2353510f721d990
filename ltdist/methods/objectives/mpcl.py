"""MPCL: meta-prototype contrastive learning, the stage-1 objective of paper 2.

"Meta-Prototype Decoupled Training for Long-tailed Learning" (Fu et al., ACCV 2022), §3.2, eqs. 1–8 and
Algorithm 1, in ltdist's one feature space: z = f(x)/‖f(x)‖, the L2-normalised backbone features that the
cosine classifier consumes.

- **Count-aware EMA prototypes** (eq. 1, with a deviation): c_k ← m_t c_k + (1−m_t) z_i for every accepted
  sample in batch order, m_t = min(m, 1 − 1/t_k) with t_k the class's update count. A class's first
  ≈ 1/(1−m) updates give the running mean of its features, later ones eq. 1 with m unchanged. Eq. 1 taken
  from the first sample (and kept on the unit sphere, as MoPro does) leaves a class seen a few dozen times
  at ≈ 97 % its first sample for m = 0.999: on Fashion-MNIST-LT after 5 epochs the tail prototypes had
  cosine 0.45–0.74 with their class means. The batch is all-gathered in rank order first and every rank
  applies the same sequential update (:func:`ltdist.kernels.prototype_ema`), so every rank holds identical
  prototypes and counts. c_k is kept un-normalised (the running mean must stay exact) and normalised
  wherever it is used (L_PC, the meta-network's input, the export).
- **Prototype contrastive loss** (eq. 2): L_PC = −log softmax_k(z · ĉ_k / τ)[y]; L = CE + λ·L_PC (eq. 3).
  The first ``warmup_epochs`` epochs use CE only while the prototypes are already updated (Alg. 1, 1–4).
- **Meta-prototypes** (eq. 4): ĉ = normalise(c + C(c; Θ)), C an encoder Linear+ReLU and a decoder
  Linear-ReLU-Linear. The paper writes ĉ = C(c); ltdist adds the residual and initialises the last layer
  at zero (``meta_init_std=0``) or small (normal with that std) so that at the end of the warm-up ĉ ≈ c:
  a random MLP would otherwise replace the prototypes the warm-up built with random directions. A zero
  last layer passes no gradient to the layers before it until it has moved itself. Classes not seen yet
  (c = 0) have ĉ = 0.
- **Bi-level step** (eqs. 6–8): before every ``meta_interval``-th optimizer step, Θ moves along the
  meta-gradient of the CE loss of a balanced meta batch through a virtual SGD step of the parameters
  in ``meta_inner`` (:mod:`ltdist.methods.objectives.meta_step`), averaged over ranks, then a step of Θ
  of size ``meta_lr``: plain SGD as eq. 7 writes it (``meta_optimizer: sgd``); ``sgd_normalised``, eq. 7's
  direction with a step of length ``meta_lr`` (Θ ← Θ − meta_lr·g/‖g‖): the meta-gradient passes through
  the virtual step lr·∇W, so its scale is tiny (∝ the learning rate, decaying with its schedule) and
  plain SGD barely moves Θ; or Adam (``adam``, as meta-weight-net code does; it moves every parameter by
  about ``meta_lr`` per step whatever the gradient's scale). The real step of W then uses Θ(t+1).
- **What the meta step does** is logged with every step line: ``meta_loss`` (the balanced meta batch's CE
  under the virtual step), ``meta_grad_norm`` and one ``meta_grad_norm/<parameter>`` per tensor of Θ,
  ``meta_update_norm`` (‖ΔΘ‖ per meta step) and ``centre_shift_mean``/``_max`` (‖ĉ_k − c_k‖ over the
  classes seen, unit rows).
- With ``meta_network: false`` this is "CE + L_PC" with the empirical prototypes (paper 2 Table 5's
  ablation row): no meta set, no meta step.

Everything here (c, the per-class update counts, Θ, the meta optimizer's state, counters) is in
:meth:`MPCLObjective.state_dict`, hence in the
verified checkpoint. Meta batches are drawn from (seed, step, rank): a resumed run draws the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ltdist.data.meta_set import MetaSet
from ltdist.engine.objective import TrainingObjective
from ltdist.fileio import torch_save_atomic
from ltdist.kernels.prototype_ema import prototype_ema
from ltdist.methods.objectives.meta_step import at_least_fp32, meta_gradient
from ltdist.models import LongTailModel


def prototypes_path(run_dir: Path) -> Path:
    """Where an MPCL run exports its prototypes and meta-prototypes (read by the mpfa stage)."""
    return Path(run_dir) / "weights" / "prototypes.pt"


def load_prototypes(run_dir: Path) -> dict[str, Any] | None:
    """``weights/prototypes.pt`` (``prototypes`` [C, F], ``meta_prototypes`` [C, F] or None, ``updates`` [C]
    when written by count-aware MPCL), or None when the run has none."""
    path = prototypes_path(run_dir)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


class MetaPrototypeNet(nn.Module):
    """C(c; Θ) as a residual map: ``forward(c [C, F]) -> ĉ [C, F]`` unit rows (zero rows stay zero)."""

    def __init__(self, dim: int, hidden: int, init_std: float = 0.0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        nn.init.normal_(self.decoder[-1].weight, std=init_std) if init_std > 0 else nn.init.zeros_(
            self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        seen = (prototypes.norm(dim=1, keepdim=True) > 0).to(prototypes.dtype)
        return F.normalize(prototypes + self.decoder(self.encoder(prototypes)), dim=1) * seen


def prototype_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                               tau: float) -> torch.Tensor:
    """Eq. 2, mean over the batch: features [B, F] (normalised here), labels [B], centres [C, F] unit rows."""
    logits = F.normalize(at_least_fp32(features), dim=1) @ at_least_fp32(centres).T / tau
    return F.cross_entropy(logits, labels)


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` [B, ...] in rank order (equal B on every rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class MPCLObjective(TrainingObjective):
    """See the module docstring. ``meta_set`` is required when ``meta_network`` is on."""

    name = "mpcl"

    def __init__(self, *, num_classes: int, feature_dim: int, lam: float, tau: float, momentum: float,
                 warmup_epochs: int, meta_network: bool, meta_inner: str, meta_optimizer: str, meta_lr: float,
                 meta_hidden: int, meta_init_std: float,
                 meta_interval: int, meta_set: MetaSet | None, meta_batch_size: int, seed: int, rank: int,
                 image_size: int, channels: int, device: torch.device, dtype: torch.dtype):
        if meta_network and meta_set is None:
            raise ValueError("MPCL with a meta-network needs a meta set (method.mpcl.meta_source)")
        self.lam, self.tau, self.momentum, self.warmup_epochs = lam, tau, momentum, warmup_epochs
        self.meta_inner, self.meta_interval, self.meta_set = meta_inner, meta_interval, meta_set
        self.meta_batch_size, self.seed, self.rank = meta_batch_size, seed, rank
        self.image_size, self.channels, self.device, self.dtype = image_size, channels, device, dtype
        self.prototypes = torch.zeros(num_classes, feature_dim, device=device)  # c [C, F], un-normalised
        self.updates = torch.zeros(num_classes, dtype=torch.int64, device=device)  # t_k [C]
        self.meta_net: MetaPrototypeNet | None = None
        self.meta_optimizer: torch.optim.Optimizer | None = None
        if meta_network:
            with torch.random.fork_rng(devices=[]):  # identical Θ on every rank, global RNG untouched
                torch.manual_seed(seed)
                self.meta_net = MetaPrototypeNet(feature_dim, meta_hidden, meta_init_std).to(device)
            optimizer = torch.optim.Adam if meta_optimizer == "adam" else torch.optim.SGD
            self.meta_optimizer = optimizer(self.meta_net.parameters(), lr=meta_lr)
        self.normalise_meta_step = meta_optimizer == "sgd_normalised"
        self.meta_steps = 0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def _record(self, name: str, value: float) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def unit_prototypes(self) -> torch.Tensor:
        """normalise(c) [C, F]: unit rows, zero rows for classes not seen yet."""
        return F.normalize(self.prototypes, dim=1)

    def centres(self) -> torch.Tensor:
        """ĉ [C, F]: the meta-prototypes (differentiable in Θ), or the EMA prototypes without a meta-network."""
        protos = self.unit_prototypes()
        return protos if self.meta_net is None else self.meta_net(protos)

    def loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        self._record("loss_ce", float(ce.detach()))
        if epoch < self.warmup_epochs:
            return ce
        with torch.no_grad():
            centres = self.centres()
        pc = prototype_contrastive_loss(features, labels, centres, self.tau)
        self._record("loss_pc", float(pc.detach()))
        return ce + self.lam * pc

    def _train_loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_train(W; Θ) of eq. 4, differentiable in both (the virtual step's objective)."""
        return F.cross_entropy(logits, labels) + self.lam * prototype_contrastive_loss(
            features, labels, self.centres(), self.tau)

    def before_micro_step(self, model: LongTailModel, images: torch.Tensor, labels: torch.Tensor, *, step: int,
                          epoch: int, lr: float) -> None:
        if self.meta_net is None or epoch < self.warmup_epochs or step % self.meta_interval:
            return
        size = self.meta_batch_size or labels.numel()
        meta_images, meta_labels = self.meta_set.batch(size, seed=self.seed, step=step, rank=self.rank,
                                                       image_size=self.image_size, channels=self.channels)
        meta_batch = (meta_images.to(self.device, self.dtype), meta_labels.to(self.device))
        theta = list(self.meta_net.parameters())
        grads, meta_loss = meta_gradient(model, self.meta_inner, (images, labels), meta_batch, theta,
                                         self._train_loss, lr)
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        if not bool(torch.isfinite(flat).all()):  # identical on every rank after the all-reduce
            self._record("meta_skipped", 1.0)
            return
        norm = float(flat.norm())
        self._record("meta_grad_norm", norm)
        sizes = [p.numel() for p in theta]
        for name, part in zip((name for name, _ in self.meta_net.named_parameters()), flat.split(sizes)):
            self._record(f"meta_grad_norm/{name}", float(part.norm()))
        if self.normalise_meta_step:  # eq. 7's direction, a step of length meta_lr (none for a zero gradient)
            flat = flat / norm if norm > 0 else flat
        before = torch.cat([p.detach().reshape(-1) for p in theta]).float()
        for p, part in zip(theta, flat.split(sizes)):
            p.grad = part.view_as(p).to(p.dtype)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        after = torch.cat([p.detach().reshape(-1) for p in theta]).float()
        self._record("meta_update_norm", float((after - before).norm()))
        self.meta_steps += 1
        self._record("meta_loss", meta_loss)

    @torch.no_grad()
    def after_micro_step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        z = _all_gather_rows(F.normalize(features.float(), dim=1))
        y = _all_gather_rows(labels.long())
        self.prototypes, self.updates = prototype_ema(self.prototypes, self.updates, z, y, self.momentum)

    @torch.no_grad()
    def centre_shift(self) -> torch.Tensor:
        """‖ĉ_k − c_k‖ [C] between unit meta-prototypes and unit prototypes (0 without a meta-network)."""
        return (self.centres() - self.unit_prototypes()).norm(dim=1)

    def metrics(self) -> dict[str, float]:
        out = {name: self._sums[name] / self._counts[name] for name in self._sums}
        out["meta_steps"] = float(self.meta_steps)
        seen = self.updates > 0
        if self.meta_net is not None and bool(seen.any()):
            shift = self.centre_shift()[seen]
            out["centre_shift_mean"], out["centre_shift_max"] = float(shift.mean()), float(shift.max())
        self._sums, self._counts = {}, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name, "prototypes": self.prototypes.detach().cpu().clone(),
                                 "updates": self.updates.cpu().clone(), "meta_steps": self.meta_steps}
        if self.meta_net is not None:
            state["meta_net"] = {k: v.detach().cpu().clone() for k, v in self.meta_net.state_dict().items()}
            state["meta_optimizer"] = self.meta_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if (self.meta_net is None) != ("meta_net" not in state):
            raise ValueError("the checkpoint's MPCL state and method.mpcl.meta_network disagree")
        self.prototypes = state["prototypes"].to(self.device, torch.float32).clone()
        if "updates" not in state:
            raise ValueError("the checkpoint's MPCL state has no per-class update counts (written before "
                             "count-aware prototypes): resume it with the ltdist version that wrote it, or start a "
                             "new output.run_id")
        self.updates = state["updates"].to(self.device, torch.int64).clone()
        self.meta_steps = int(state["meta_steps"])
        if self.meta_net is not None:
            self.meta_net.load_state_dict(state["meta_net"])
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])

    def export(self, run_dir: Path) -> None:
        """``weights/prototypes.pt``: EMA prototypes and meta-prototypes [C, F] (unit rows, zero for unseen),
        and the per-class update counts [C]."""
        with torch.no_grad():
            meta = None if self.meta_net is None else self.centres().float().cpu()
        torch_save_atomic({"prototypes": self.unit_prototypes().float().cpu(), "meta_prototypes": meta,
                           "updates": self.updates.cpu(), "space": "l2-normalised backbone features"},
                          prototypes_path(run_dir))
