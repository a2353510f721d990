"""The decoupled-training baselines on a frozen backbone: cRT, τ-norm, LWS, NCM and post-hoc logit adjustment.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition" (ICLR 2020,
arXiv:1910.09217; code: facebookresearch/classifier-balancing) define the first four; Menon et al.,
"Long-tail learning via logit adjustment" (ICLR 2021, arXiv:2007.07314) the last. Each ``build_*``
turns the :class:`~ltdist.methods.classifier_set.FrozenInputs` of a run into a
:class:`~ltdist.methods.classifier_set.ClassifierSet` with one row, whose scorer is a
:class:`~ltdist.methods.classifier_set.LinearScorer`:

- cRT: a re-initialised linear classifier f Wᵀ + b trained on class-balanced samples of the train features;
- τ-norm: the stage-1 weights w_i / ‖w_i‖^τ, bias dropped (a cosine head keeps its normalised input and
  scale s: s · f̂ · w_i / ‖w_i‖^τ, which is the cosine head itself at τ = 1), τ chosen on val;
- LWS: the stage-1 scores times a learned per-class scale s_i (class-balanced training, the head frozen);
- NCM: −‖x̂ − μ_i‖² with x̂ = normalise(f − m), m the mean train feature, μ_i the class means of x̂;
- logit adjustment: the stage-1 scores − τ · log π_i, π the train class prior, τ chosen on val.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ltdist.data.sampling import class_probabilities
from ltdist.methods.classifier_set import ClassifierSet, FrozenInputs, LinearScorer, head_scorer, select_on_val


def _grid_0_to_2() -> list[float]:
    return [round(0.1 * i, 1) for i in range(21)]  # 0, 0.1, …, 2: classifier-balancing's tau_norm.py grid


@dataclass
class RetrainConfig:
    """A classifier trained on the frozen train features (cRT, LWS); defaults: classifier-balancing's cls_crt."""

    epochs: int = 10  # passes of max_j(n_j) · C sampled features (classifier-balancing's ClassAwareSampler)
    batch_size: int = 512
    lr: float = 0.2  # cosine-decayed to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sampling_power: float = 0.0  # q_j ∝ n_j^p over the features: 0 class balanced


@dataclass
class PostHocConfig:
    """A parameter chosen on val from ``grid``; ``default`` when the dataset has no val split."""

    grid: list[float] = field(default_factory=_grid_0_to_2)
    default: float = 1.0


@dataclass
class NCMConfig:
    center: bool = True  # subtract the mean train feature before normalising (classifier-balancing's "cl2n")


def balanced_batches(labels: torch.Tensor, power: float, batch_size: int, steps: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches [batch_size] into ``labels`` [N]: a class drawn with q_j ∝ n_j^power, then one of its samples.

    power 0 is classifier-balancing's class-aware sampling in expectation (every class equally often);
    classes without a sample are never drawn. Sampling is with replacement, independently per draw.
    """
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    q = torch.as_tensor(class_probabilities(counts.tolist(), power), dtype=torch.float64)
    order = torch.argsort(labels, stable=True)  # class j's samples are order[starts[j] : starts[j] + n_j]
    starts = torch.cumsum(counts, 0) - counts
    for _ in range(steps):
        classes = torch.multinomial(q, batch_size, replacement=True, generator=generator)
        within = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * counts[classes]).long()
        yield order[starts[classes] + within]


def train_balanced(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   cfg: RetrainConfig, seed: int) -> torch.Tensor:
    """Fit ``module`` (inputs [B, D] → logits [B, C]) with cross-entropy on class-balanced batches.

    ``cfg`` (the dataclass or its OmegaConf node): SGD with momentum and weight decay, the lr cosine-decayed
    per step to 0 (classifier-balancing decays per epoch). An epoch is max_j(n_j) · (classes with samples)
    draws, the length of classifier-balancing's ClassAwareSampler. ``inputs`` and ``module`` share a device.
    Returns [num_classes] int64: how often each class was drawn.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    per_epoch = int(counts.max()) * int((counts > 0).sum())
    steps = cfg.epochs * math.ceil(per_epoch / cfg.batch_size)
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    seen = torch.zeros(num_classes, dtype=torch.int64)
    labels_cpu = labels.cpu()
    for batch in balanced_batches(labels_cpu, cfg.sampling_power, cfg.batch_size, steps, generator):
        seen += torch.bincount(labels_cpu[batch], minlength=num_classes)
        batch = batch.to(inputs.device)
        loss = F.cross_entropy(module(inputs[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return seen


def _sampling_note(cfg: RetrainConfig) -> str:
    sampling = "class-balanced" if cfg.sampling_power == 0 else f"q_j ∝ n_j^{cfg.sampling_power:g}"
    return (f"{cfg.epochs} epochs, {sampling} batches of {cfg.batch_size}, SGD lr {cfg.lr:g} (cosine to 0), "
            f"momentum {cfg.momentum:g}, weight decay {cfg.weight_decay:g}")


def build_crt(inputs: FrozenInputs, cfg: RetrainConfig, seed: int, device: torch.device | str = "cpu") -> ClassifierSet:
    """cRT: a new nn.Linear(F, C) (PyTorch's default initialisation) trained on the train features [N, F]."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(inputs.feature_dim, inputs.num_classes).to(device)
    features = inputs.train["features"].float().to(device)
    seen = train_balanced(linear, features, inputs.train["labels"].to(device), inputs.num_classes, cfg, seed)
    scorer = LinearScorer("linear", linear.weight.detach().cpu(), linear.bias.detach().cpu())
    return ClassifierSet("crt", {"cRT": scorer}, chosen={"class_draws": seen.tolist()},
                         notes=[f"re-initialised linear classifier, {_sampling_note(cfg)}"])


def tau_normalise(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_i / ‖w_i‖^τ for every row of ``weight`` [C, F]: τ = 0 the weights as they are, τ = 1 unit rows."""
    norms = weight.float().norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row stays zero
    return weight.float() / norms.pow(tau)


def tau_norm_scorer(head: LinearScorer, tau: float) -> LinearScorer:
    """The τ-normalised stage-1 head: f · (w_i/‖w_i‖^τ)ᵀ (bias dropped), s · f̂ · (w_i/‖w_i‖^τ)ᵀ for a cosine head."""
    if head.kind == "cosine":
        return LinearScorer("linear", head.scale * tau_normalise(head.weight, tau), normalize_features=True)
    return LinearScorer("linear", tau_normalise(head.weight, tau))


def build_tau_norm(inputs: FrozenInputs, cfg: PostHocConfig) -> ClassifierSet:
    """τ-norm with τ chosen on val from ``cfg.grid`` (``cfg.default`` without a val split)."""
    head = head_scorer(inputs.head)
    candidates = {float(t): tau_norm_scorer(head, float(t)) for t in cfg.grid}
    tau, accuracy, note = select_on_val(candidates, inputs.val, float(cfg.default), "τ")
    return ClassifierSet("tau_norm", {"τ-norm": candidates[tau]}, chosen={"tau": tau, "val_accuracy": accuracy},
                         notes=[note])


class _ClassScales(nn.Module):
    """LWS on precomputed stage-1 scores: scores [B, C] → s ⊙ scores, s [C] initialised at 1."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.scales


def lws_scorer(head: LinearScorer, scales: torch.Tensor) -> LinearScorer:
    """s_i · (stage-1 score of class i) as one scorer: s_i folds into w_i (and b_i; a cosine head becomes a linear
    scorer on normalised features with rows s_i · s · ŵ_i). ``scales`` [C]."""
    scales = scales.detach().float().cpu()
    if head.kind == "cosine":
        return LinearScorer("linear", scales[:, None] * head.scale * F.normalize(head.weight.float(), dim=1),
                            normalize_features=True)
    bias = None if head.bias is None else scales * head.bias
    return LinearScorer("linear", scales[:, None] * head.weight.float(), bias)


def build_lws(inputs: FrozenInputs, cfg: RetrainConfig, seed: int, device: torch.device | str = "cpu") -> ClassifierSet:
    """LWS: per-class scales on the frozen stage-1 head, trained on class-balanced train features."""
    head = head_scorer(inputs.head)
    scores = head.scores(inputs.train["features"]).to(device)  # frozen: computed once, [N, C]
    module = _ClassScales(inputs.num_classes).to(device)
    seen = train_balanced(module, scores, inputs.train["labels"].to(device), inputs.num_classes, cfg, seed)
    scales = module.scales.detach().cpu()
    return ClassifierSet("lws", {"LWS": lws_scorer(head, scales)},
                         chosen={"scales": scales.tolist(), "class_draws": seen.tolist()},
                         notes=[f"learned per-class scales in [{scales.min():.3g}, {scales.max():.3g}], "
                                f"{_sampling_note(cfg)}"])


def ncm_scorer(features: torch.Tensor, labels: torch.Tensor, num_classes: int, center: bool) -> LinearScorer:
    """Nearest class mean: −‖x̂ − μ_i‖² + 1 = 2 x̂·μ_i − ‖μ_i‖² with x̂ = normalise(f − m) (m = 0 without ``center``).

    ``features`` [N, F] train features, ``labels`` [N]; μ_i [C, F] is the mean x̂ of class i (zero without samples).
    The dropped constant changes neither the ranking nor the softmax.
    """
    mean = features.float().mean(dim=0) if center else None
    shifted = features.float() - mean if center else features.float()
    normalised = F.normalize(shifted, dim=1)
    sums = torch.zeros(num_classes, features.shape[1]).index_add_(0, labels, normalised)
    means = sums / torch.bincount(labels, minlength=num_classes).clamp_min(1)[:, None]
    return LinearScorer("linear", 2 * means, -means.pow(2).sum(dim=1), center=mean, normalize_features=True)


def build_ncm(inputs: FrozenInputs, cfg: NCMConfig) -> ClassifierSet:
    """NCM over the train features (``cfg.center``: classifier-balancing's "cl2n" features, else "l2n")."""
    scorer = ncm_scorer(inputs.train["features"], inputs.train["labels"], inputs.num_classes, cfg.center)
    features = "mean-centred, L2-normalised" if cfg.center else "L2-normalised"
    return ClassifierSet("ncm", {"NCM": scorer}, chosen={"center": bool(cfg.center)},
                         notes=[f"squared Euclidean distance to the class means of the {features} train features"])


def logit_adjusted_scorer(head: LinearScorer, train_counts: torch.Tensor, tau: float) -> LinearScorer:
    """The stage-1 scores − τ · log π_i, π_i = n_i / Σn (a class without samples counts as 1, not log 0)."""
    prior = train_counts.double().clamp_min(1)
    prior = prior / prior.sum()
    return replace(head, offset=(-tau * prior.log()).float())


def build_logit_adjust(inputs: FrozenInputs, cfg: PostHocConfig) -> ClassifierSet:
    """Post-hoc logit adjustment of the stage-1 head, τ chosen on val from ``cfg.grid``."""
    head = head_scorer(inputs.head)
    candidates = {float(t): logit_adjusted_scorer(head, inputs.train_counts, float(t)) for t in cfg.grid}
    tau, accuracy, note = select_on_val(candidates, inputs.val, float(cfg.default), "τ")
    return ClassifierSet("logit_adjust", {"logit adjustment (post-hoc)": candidates[tau]},
                         chosen={"tau": tau, "val_accuracy": accuracy}, notes=[note])

