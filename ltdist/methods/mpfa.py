"""Meta-prototype feature augmentation (MPFA): calibrated Gaussian features for the under-represented classes.

After "Meta-Prototype Decoupled Training for Long-tailed Learning" (Fu et al., ACCV 2022), §3.3,
eqs. 9–10: every real feature of a class with fewer samples than the largest class generates new
features from a Gaussian whose mean and covariance borrow from the centres and spreads of its
nearest better-populated classes.

**One feature space.** Real features, class centres, class scatters and generated features all live
in T(f) = normalise(sign(f)·|f|^λ) (:func:`ltdist.methods.classifier_set.power_normalise`): Tukey's
power λ (``method.mpfa.tukey``, 1.0 = off) on the non-negative (post-ReLU) backbone features, then
the L2 normalisation the centres carry. Meta-prototypes are unit vectors of the normalised backbone
feature space; T ignores a positive rescaling of a row, so T(prototype) lands in the same space as
T(feature). Empirical centres are the normalised class means of T(f). The classifier retrained on
these features keeps T (``LinearScorer.feature_power``), so evaluate scores test features in it too.

**Calibration** of a real feature z̃_i of class o with 0 < N_o < N_1 (N_1: the largest count):

- S_ij = cos(z̃_i, ĉ_j) for the classes j with N_j > N_o only: never o itself, never a class with
  fewer (or as many) samples;
- 𝒩_i: the top-M of S_i (M = ``method.mpfa.neighbours``; fewer when fewer classes qualify, the
  unused slots get weight 0); w_ij = softmax of S_ij over 𝒩_i, divided by |𝒩_i| with
  ``literal_inv_m`` (the paper writes an extra 1/M in front of weights that already sum to 1);
- μ_i = (1−α) z̃_i + α Σ_j w_ij ĉ_j;  Σ_i = (1−α)² Σ_o + α² Σ_j w_ij Σ_j + B (eq. 10), with
  Σ_k = (1/(N_k−1)) Σ_{f∈k} (f − ĉ_k)(f − ĉ_k)ᵀ (eq. 9, the scatter around the centre, not the mean)
  and B = β·I (``beta_form=identity``: an isotropic spread) or β·11ᵀ (``all_entries``: β added to
  every entry of Σ, as the distribution-calibration reference code does). α is one value for all
  classes (``method.mpfa.alpha``; the stage can choose it on val).

Σ_k is never formed as d×d: ``ltdist._C::calibrated_sample`` draws through the centred class
features themselves (:mod:`ltdist.kernels.calibrated_sampler`); memory is the bank.

**How many** (``method.mpfa.count``): ``balanced`` brings every class to N_1 features, spreading its
N_1 − N_k generated features evenly over its N_k real ones (the first (N_1 − N_k) mod N_k real
features make one more), and the largest classes generate nothing; ``paper`` follows
s_new = max{⌈N_1/N_k − 1⌉, 1} literally: every real feature of every class makes at least one, the
largest class included. A largest class has no class with more samples to borrow from, so its only
"neighbour" is itself (weight 1): μ = (1−α) z̃ + α ĉ_o, Σ = ((1−α)² + α²) Σ_o + B.

**Edge cases.** A class with 1 feature has no scatter (Σ_o = 0): its features spread by the
neighbours' scatter and B only. A class with 2 features has a rank-1 scatter. A class with no
training feature generates nothing and is never a neighbour (it has fewer samples than everyone);
the stage gives it a fallback classifier row. Non-finite features are rejected when the inputs are
loaded; non-finite meta-prototypes are rejected here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ltdist.kernels.calibrated_sampler import calibrated_sample, group_bank
from ltdist.methods.classifier_set import power_normalise

CHUNK = 4096  # rows transformed / compared with all centres at once: bounds the [CHUNK, C] similarities


def build_bank(features: torch.Tensor, labels: torch.Tensor, num_classes: int, tukey: float,
               in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The training features in the MPFA space, grouped by class.

    Args:
        features: [N, d] backbone features (any float dtype, un-normalised); labels: [N] int64.
        tukey: the Tukey power λ.
        in_place: build the bank inside ``features`` when it is contiguous float32 on the CPU (its rows are
            overwritten; the caller drops it): the set-up then holds one bank, not two.
    Returns:
        bank [N, d] float32 (rows T(f), class c owns rows offsets[c]:offsets[c+1]) and offsets [C+1] int64.
    """
    bank, offsets = group_bank(features, labels, num_classes, in_place=in_place)
    for start in range(0, bank.shape[0], CHUNK):  # in place, chunk by chunk: one bank in memory, not two
        rows = bank[start:start + CHUNK]
        rows.copy_(power_normalise(rows, tukey))
    return bank, offsets


def empirical_centres(bank: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Normalised class means of the bank rows: [C, d] unit rows (a zero row for a class with no rows)."""
    counts = offsets[1:] - offsets[:-1]
    labels = torch.repeat_interleave(torch.arange(counts.numel(), device=bank.device), counts)
    sums = torch.zeros(counts.numel(), bank.shape[1], dtype=torch.float64, device=bank.device)
    for start in range(0, bank.shape[0], CHUNK):  # float64 sums, chunk by chunk: no float64 copy of the bank
        sums.index_add_(0, labels[start:start + CHUNK], bank[start:start + CHUNK].double())
    return F.normalize(sums, dim=1).float()


def meta_centres(meta_prototypes: torch.Tensor, num_classes: int, dim: int, tukey: float) -> torch.Tensor:
    """Meta-prototypes [C, d] (unit rows of the normalised backbone feature space) mapped into the MPFA space.

    Raises:
        ValueError: wrong shape, or NaN/Inf in a prototype.
    """
    if tuple(meta_prototypes.shape) != (num_classes, dim):
        raise ValueError(f"mpfa: meta_prototypes have shape {tuple(meta_prototypes.shape)}, expected "
                         f"[{num_classes}, {dim}] (classes × feature dim of the extracted features)")
    bad = (~torch.isfinite(meta_prototypes)).any(dim=1)
    if bool(bad.any()):
        raise ValueError(f"mpfa: meta-prototypes of classes {bad.nonzero().flatten()[:5].tolist()} contain NaN "
                         f"or Inf: the MPCL run diverged; use method.mpfa.centres=empirical")
    return power_normalise(meta_prototypes, tukey)


def generation_counts(counts: torch.Tensor, mode: str) -> torch.Tensor:
    """Generated features per real feature, by class position: [N] int64 for the grouped bank.

    Args:
        counts: [C] int64 real features per class.
        mode: ``balanced`` (class k gets N_1 − N_k, spread evenly) or ``paper`` (max(⌈N_1/N_k − 1⌉, 1)
            per real feature of every class, the largest included).
    Returns:
        per_source [N] int64: row r of the grouped bank (class k, i-th of its rows) makes per_source[r].
    """
    n1 = int(counts.max())
    classes = torch.arange(counts.numel(), device=counts.device)
    labels = torch.repeat_interleave(classes, counts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(labels.numel(), device=counts.device) - starts[labels]  # i within its class
    n_k = counts[labels]
    if mode == "balanced":
        missing = n1 - n_k
        return missing // n_k + (position < missing % n_k).long()
    if mode == "paper":
        return torch.clamp((n1 - n_k + n_k - 1) // n_k, min=1)  # integer ⌈(N_1 − N_k)/N_k⌉, at least 1
    raise ValueError(f"mpfa: count must be 'balanced' or 'paper', got {mode!r}")


@dataclass
class AugmentationPlan:
    """Everything needed to draw any generated feature, without drawing it.

    ``bank`` [N, d] float32, ``offsets`` [C+1] int64, ``labels`` [N] int64: the grouped real features
    (:func:`build_bank`). ``centres`` [C, d] unit rows. ``neighbours`` [N, M] int64 and ``weights``
    [N, M] float32: each row's neighbour classes and their weights (for a row that generates nothing:
    its own class, weight 0). ``per_source`` [N] int64 generated features per row, ``cumulative`` its
    inclusive running sum. Generated feature g (0 ≤ g < :attr:`generated`) comes from row
    :meth:`source_of` (g).
    """

    bank: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    centres: torch.Tensor
    neighbours: torch.Tensor
    weights: torch.Tensor
    per_source: torch.Tensor
    cumulative: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_real(self) -> int:
        return self.bank.shape[0]

    @property
    def generated(self) -> int:
        return int(self.cumulative[-1]) if self.cumulative.numel() else 0

    @property
    def size(self) -> int:
        """Real plus generated features: the items of one retrain epoch."""
        return self.num_real + self.generated

    def source_of(self, generated_ids: torch.Tensor) -> torch.Tensor:
        """Bank rows [S] int64 that generate the features ``generated_ids`` [S] (each in [0, generated))."""
        return torch.searchsorted(self.cumulative, generated_ids, right=True)

    def class_totals(self) -> torch.Tensor:
        """[C] int64 real + generated features per class."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return counts + torch.zeros_like(counts).index_add_(0, self.labels, self.per_source)


def select_neighbours(bank: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, counts: torch.Tensor,
                      generating: torch.Tensor, num_neighbours: int,
                      literal_inv_m: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-M neighbour classes and their weights for every bank row.

    Args:
        bank: [N, d] rows z̃_i; labels: [N] their classes; centres: [C, d]; counts: [C] real features.
        generating: [N] bool, rows that generate features.
        num_neighbours: M; literal_inv_m: divide the softmax weights by the number of neighbours.
    Returns:
        neighbours [N, M] int64, weights [N, M] float32. Only classes with more training features
        than the row's class qualify; unused slots repeat the first neighbour with weight 0; rows
        that do not generate get their own class with weight 0; generating rows of a largest class
        (``count=paper``), for which no class qualifies, get their own class with weight 1.
    """
    num_rows, num_classes = bank.shape[0], centres.shape[0]
    m = min(num_neighbours, num_classes)
    neighbours = labels[:, None].repeat(1, num_neighbours)
    weights = torch.zeros(num_rows, num_neighbours, dtype=torch.float32, device=bank.device)
    unit_centres = F.normalize(centres, dim=1)
    for start in range(0, num_rows, CHUNK):
        rows = torch.arange(start, min(start + CHUNK, num_rows), device=bank.device)
        rows = rows[generating[rows]]
        if rows.numel() == 0:
            continue
        sim = F.normalize(bank[rows], dim=1) @ unit_centres.T  # S_ij, [rows, C]
        eligible = counts[None, :] > counts[labels[rows]][:, None]
        sim = sim.masked_fill(~eligible, float("-inf"))
        top, index = sim.topk(m, dim=1)
        valid = torch.isfinite(top)  # a row of a class below N_1 always has the largest class eligible
        alone = ~valid[:, 0]  # a largest class: itself as the one neighbour
        top[alone, 0], index[alone, 0], valid[alone, 0] = 0.0, labels[rows][alone], True
        w = torch.softmax(top, dim=1)  # exp(−inf) = 0: ineligible slots get no weight
        if literal_inv_m:
            w = w / valid.sum(dim=1, keepdim=True)
        index = torch.where(valid, index, index[:, :1])
        neighbours[rows, :m] = index
        weights[rows, :m] = w.float()
        if m < num_neighbours:  # fewer classes than M: pad with weight 0
            neighbours[rows, m:] = index[:, :1]
    return neighbours, weights


def plan_augmentation(bank: torch.Tensor, offsets: torch.Tensor, centres: torch.Tensor, *, num_neighbours: int,
                      literal_inv_m: bool, count: str) -> AugmentationPlan:
    """Neighbours, weights and generation counts for a bank (:func:`build_bank`) and its centres [C, d]."""
    counts = offsets[1:] - offsets[:-1]
    labels = torch.repeat_interleave(torch.arange(counts.numel(), device=bank.device), counts)
    per_source = generation_counts(counts, count)
    neighbours, weights = select_neighbours(bank, labels, centres, counts, per_source > 0, num_neighbours,
                                            literal_inv_m)
    return AugmentationPlan(bank=bank, offsets=offsets, labels=labels, centres=centres, neighbours=neighbours,
                            weights=weights, per_source=per_source, cumulative=torch.cumsum(per_source, 0))


def draw_features(plan: AugmentationPlan, sources: torch.Tensor, *, alpha: float, beta: float, beta_form: str,
                  seed: int, draws: int = 1, streams: torch.Tensor | None = None,
                  precision: str = "fp32") -> torch.Tensor:
    """``draws`` calibrated features per source row: [S, draws, d] float32 on the bank's device.

    Args:
        sources: [S] int64 bank rows (repeats allowed: each row of the request draws independently).
        alpha, beta, beta_form: eq. 10's α, β and the form of "+ β" (``identity`` | ``all_entries``).
        seed, streams: draw r of request s is a pure function of (seed, streams[s], r); streams [S] int64
            defaults to the positions in ``sources``.
        draws: features per source. All draws of a call that use one class are one GEMM.
        precision: the sampler's GEMM precision (fp32 | tf32 on CUDA | bf16).
    """
    if beta_form not in ("identity", "all_entries"):
        raise ValueError(f"mpfa: beta_form must be 'identity' or 'all_entries', got {beta_form!r}")
    # β·11ᵀ = (√β·1)(√β·1)ᵀ: one shared standard normal per draw, added to every coordinate
    isotropic, shared = (beta, 0.0) if beta_form == "identity" else (0.0, beta)
    return calibrated_sample(plan.bank, plan.offsets, plan.centres, plan.bank[sources], plan.labels[sources],
                             plan.neighbours[sources], plan.weights[sources], alpha, isotropic, draws, seed,
                             streams=None if streams is None else streams.to(plan.bank.device), beta_shared=shared,
                             precision=precision)
