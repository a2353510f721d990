"""What every stage-2 classifier method shares: its inputs, its output file and its choices on val.

A stage-2 method (``kt``, ``mpfa``, ``crt``, ``tau_norm``, ``lws``, ``ncm``, ``logit_adjust``) works on
the frozen backbone: it reads the extracted features (``features/<split>.pt``) and the stage-1 head
(``weights/final.pt``) and writes ``classifiers/<name>.pt``. Apart from KT, whose file keeps its own
structure (:class:`ltdist.methods.kt.KTClassifiers`), that file is a :class:`ClassifierSet`: named
rows, each a :class:`LinearScorer` (or an ensemble of other rows), plus what the method chose on val.
``evaluate`` scores every row of every file it finds.

- :class:`LinearScorer`: scores [B, C] = s · f̂ Ŵᵀ (cosine) or f Wᵀ + b (linear), plus a per-class
  offset [C] (post-hoc logit adjustment); features may first be centred and (linear) L2-normalised.
  Every baseline folds into one: τ-norm and LWS rescale W (and b), NCM is a linear scorer on centred,
  normalised features (−‖f̂ − μ_i‖² up to a constant). A scorer trained in a transformed feature space
  (MPFA's Tukey power) carries that transform (``feature_power``, :func:`power_normalise`).
- :func:`head_scorer`: the stage-1 head as a scorer.
- :func:`load_frozen_inputs`: train / val / test features, training counts, the stage-1 head.
- :func:`select_on_val`: the candidate with the best val accuracy; test is never looked at.
- :func:`run_on_rank0`: the stage skeleton (rank 0 computes and saves, the other ranks wait);
  :func:`run_on_all_ranks` when the build itself is distributed (MPFA's retrain).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ltdist.distributed import barrier
from ltdist.fileio import torch_save_atomic
from ltdist.labels import check_label_range
from ltdist.rundir import features_path, load_features, model_path

log = logging.getLogger(__name__)

KT_FILE = "kt"  # classifiers/kt.pt has its own structure (ltdist.methods.kt.KTClassifiers)


def power_normalise(features: torch.Tensor, power: float) -> torch.Tensor:
    """normalise(sign(f) · |f|^λ) row-wise: features [N, F] → unit rows [N, F] (float32).

    On non-negative (post-ReLU) backbone features this is Tukey's ladder of powers followed by L2
    normalisation; the sign-preserving form keeps features with negative entries finite. It is
    invariant to a positive rescaling of a row, so it maps L2-normalised vectors (e.g. prototypes
    kept in the normalised feature space) the same way as the raw features. λ = 1: normalisation only.
    A zero row stays zero.
    """
    features = features.float()
    if power != 1.0:
        features = features.sign() * features.abs().pow(power)
    return F.normalize(features, dim=1)


@dataclass
class LinearScorer:
    """One classifier over frozen features.

    kind "cosine": scores = scale · normalise(f) · normalise(weight)ᵀ (+ offset);
    kind "linear": scores = f · weightᵀ + bias (+ offset), with f normalised first if ``normalize_features``.
    ``weight`` [C, F] float32, ``bias`` [C] or None, ``offset`` [C] or None (added to every sample's scores),
    ``center`` [F] or None (subtracted from every feature before the scoring). ``feature_power`` λ or None:
    when set, f is first replaced by :func:`power_normalise` (f, λ), the space the scorer was trained in.
    """

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    offset: torch.Tensor | None = None
    center: torch.Tensor | None = None
    normalize_features: bool = False
    feature_power: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "linear"):
            raise ValueError(f"LinearScorer.kind must be 'cosine' or 'linear', got {self.kind!r}")
        num_classes = self.weight.shape[0]
        for name in ("bias", "offset"):
            value = getattr(self, name)
            if value is not None and value.shape != (num_classes,):
                raise ValueError(f"LinearScorer.{name} must have shape [{num_classes}], got {tuple(value.shape)}")
        if self.center is not None and self.center.shape != self.weight.shape[1:]:
            raise ValueError(f"LinearScorer.center must have shape [{self.weight.shape[1]}], "
                             f"got {tuple(self.center.shape)}")
        if not bool(torch.isfinite(self.weight).all()):
            raise ValueError("LinearScorer.weight has non-finite values")

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F] → scores [B, C] (float32, on the features' device)."""
        weight = self.weight.to(features.device, torch.float32)
        features = features.float()
        if self.feature_power is not None:
            features = power_normalise(features, self.feature_power)
        if self.center is not None:
            features = features - self.center.to(features.device, torch.float32)
        if self.kind == "cosine":
            out = self.scale * F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T
        else:
            if self.normalize_features:
                features = F.normalize(features, dim=1)
            out = features @ weight.T
            if self.bias is not None:
                out = out + self.bias.to(features.device, torch.float32)
        if self.offset is not None:
            out = out + self.offset.to(features.device, torch.float32)
        return out

    def state_dict(self) -> dict[str, Any]:
        tensor = lambda t: None if t is None else t.detach().float().cpu()
        return {"kind": self.kind, "weight": tensor(self.weight), "bias": tensor(self.bias), "scale": float(self.scale),
                "offset": tensor(self.offset), "center": tensor(self.center),
                "normalize_features": bool(self.normalize_features), "feature_power": self.feature_power}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LinearScorer:
        return cls(**state)


def head_scorer(head: torch.nn.Module) -> LinearScorer:
    """The stage-1 head as a scorer: a cosine head (weight, scale) or a linear one (weight, bias)."""
    if hasattr(head, "scale"):
        return LinearScorer("cosine", head.weight.detach().float(), scale=float(head.scale.detach()))
    return LinearScorer("linear", head.weight.detach().float(), head.bias.detach().float())


class Scorer(Protocol):
    """Anything :func:`select_on_val` can rank: scores [B, C] for features [B, F]."""

    @property
    def num_classes(self) -> int: ...

    def scores(self, features: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ClassifierSet:
    """The output of one stage-2 method: ``classifiers/<method>.pt``.

    ``rows``: row name → scorer, in report order. ``ensembles``: row name → member rows whose softmax
    probabilities are averaged; a member is a row of this set or ``"<file>/<row>"`` of another file
    (``"kt/ensemble"`` is the KT ensemble). ``chosen``: what was selected on val (JSON-able).
    ``notes``: lines for the report (what was chosen, what was missing).
    """

    method: str
    rows: dict[str, LinearScorer]
    ensembles: dict[str, list[str]] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return next(iter(self.rows.values())).num_classes

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rows": {n: s.state_dict() for n, s in self.rows.items()},
                "ensembles": {n: list(m) for n, m in self.ensembles.items()}, "chosen": dict(self.chosen),
                "notes": list(self.notes)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ClassifierSet:
        rows = {n: LinearScorer.from_state_dict(s) for n, s in state["rows"].items()}
        return cls(state["method"], rows, dict(state["ensembles"]), dict(state["chosen"]), list(state["notes"]))


def classifier_path(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / "classifiers" / f"{method}.pt"


def save_classifier_set(run_dir: Path, result: ClassifierSet) -> Path:
    path = classifier_path(run_dir, result.method)
    torch_save_atomic(result.state_dict(), path)
    return path


def load_classifier_sets(run_dir: Path) -> dict[str, ClassifierSet]:
    """Every ``classifiers/<method>.pt`` but KT's, by method name, sorted by name."""
    found = {}
    for path in sorted((Path(run_dir) / "classifiers").glob("*.pt")):
        if path.stem == KT_FILE:
            continue
        found[path.stem] = ClassifierSet.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return found


@dataclass
class FrozenInputs:
    """What a stage-2 method starts from.

    ``train``, ``val``, ``test``: feature dicts (``features`` [N, F] float32 un-normalised, ``labels``
    [N] int64, ``keys``); ``val`` is None when the dataset has no val split. ``train_counts`` [C] int64:
    the training count per class (the long-tail profile). ``head``: the stage-1 classifier module.
    """

    train: dict
    val: dict | None
    test: dict
    train_counts: torch.Tensor
    head: torch.nn.Module

    @property
    def num_classes(self) -> int:
        return self.train_counts.numel()

    @property
    def feature_dim(self) -> int:
        return self.train["features"].shape[1]


def load_frozen_inputs(run_dir: Path, method: str) -> FrozenInputs:
    """Load the extracted features and the stage-1 head; errors name the stage that is missing."""
    from ltdist.models import load_exported_model

    weights = model_path(run_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the {method} stage needs the train stage's model export")
    head = load_exported_model(weights).classifier
    num_classes = head.weight.shape[0]
    train = load_features(run_dir, "train")
    test = load_features(run_dir, "test")
    val = load_features(run_dir, "val") if features_path(run_dir, "val").is_file() else None
    if val is not None and val["labels"].numel() == 0:
        val = None
    for split, data in (("train", train), ("val", val), ("test", test)):
        if data is None:
            continue
        labels = data["labels"]
        check_label_range(labels, num_classes, f"{method}: {split} labels (classes of the trained head)")
        if not bool(torch.isfinite(data["features"]).all()):
            bad = (~torch.isfinite(data["features"])).any(dim=1).nonzero().flatten()[:5].tolist()
            raise ValueError(f"{method}: non-finite {split} features (rows {bad}...): re-run the extract stage "
                             f"from a finite model")
    counts = torch.bincount(train["labels"], minlength=num_classes)
    return FrozenInputs(train=train, val=val, test=test, train_counts=counts, head=head)


def balanced_accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean per-class top-1 in [0, 1] over the classes present in ``labels`` (scores [N, C], labels [N])."""
    correct = (scores.argmax(dim=1) == labels).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    present = torch.bincount(labels, minlength=num_classes)
    mask = present > 0
    return float((per_class[mask] / present[mask]).mean())


def select_on_val(candidates: Mapping[Any, Scorer], val: dict | None, default: Any,
                  what: str) -> tuple[Any, dict[str, float], str]:
    """Pick the candidate with the best mean per-class top-1 on val (ties: the first in order).

    Args:
        candidates: parameter value → scorer, in the order ties are broken.
        val: the val feature dict, or None (no val split: ``default`` is returned).
        default: the documented choice when there is no val split (must be a key of ``candidates``).
        what: the parameter's name for the note, e.g. "τ".
    Returns:
        (chosen value, {str(value): val accuracy}, a note for the report).
    """
    if default not in candidates:
        raise ValueError(f"select_on_val: default {default!r} is not a candidate")
    if val is None:
        note = f"{what} = {default} (documented default: the dataset has no val split)"
        log.warning("%s", note)
        return default, {}, note
    labels = val["labels"]
    accuracy = {str(value): balanced_accuracy(scorer.scores(val["features"]), labels, scorer.num_classes)
                for value, scorer in candidates.items()}
    best = max(candidates, key=lambda value: accuracy[str(value)])  # max keeps the first of equal values
    note = f"{what} = {best} chosen on val (mean per-class top-1 {100 * accuracy[str(best)]:.1f} %)"
    return best, accuracy, note


def _save_and_log(ctx, method: str, result: ClassifierSet) -> None:
    if result.method != method:
        raise ValueError(f"stage {method} built a classifier set named {result.method!r}")
    path = save_classifier_set(ctx.run_dir, result)
    ctx.append_metrics({"stage": method, "rows": [*result.rows, *result.ensembles], "chosen": result.chosen})
    log.info("%s: wrote %s (%s)", method, path, "; ".join(result.notes) or "no choices made")


def run_on_rank0(ctx, method: str, build: Callable[[FrozenInputs], ClassifierSet]) -> None:
    """The body of a stage-2 stage: rank 0 loads, builds, saves and logs; every rank meets at a barrier.

    ``ctx`` is the :class:`ltdist.stages.StageContext`; ``build`` gets the frozen inputs of the run and
    returns the set saved as ``classifiers/<method>.pt``.
    """
    if ctx.dist.is_main:
        _save_and_log(ctx, method, build(load_frozen_inputs(ctx.run_dir, method)))
    barrier()


def run_on_all_ranks(ctx, method: str, build: Callable[[FrozenInputs], ClassifierSet]) -> None:
    """As :func:`run_on_rank0`, but every rank loads the inputs and runs ``build`` (which may use
    collectives, and must return the same set on every rank); rank 0 saves and logs."""
    result = build(load_frozen_inputs(ctx.run_dir, method))
    if ctx.dist.is_main:
        _save_and_log(ctx, method, result)
    barrier()
