"""Compositional knowledge-transfer classifiers (paper 1, §3.2, eqs. 3–9) and their ensemble.

Everything lives in the L2-normalised feature space the cosine classifier consumes. A class
"vector" here is one row of a [C, F] matrix used as a cosine classifier: logits = s · f̂ · v̂ᵀ.

- prototypes p_i (eq. 3): normalised mean of the normalised features of class i;
- w_h(k) (eqs. 4–7) and w_hc(k) (eq. 9) for several k at once: :func:`ltdist.kernels.kt_attention`
  (Triton on CUDA, PyTorch reference elsewhere) — this module only prepares its inputs;
- the ensemble (eq. 8): mean of the softmax probabilities of several classifiers, with the scale s.

Classes the backbone never trained on (n_j = 0 in the backbone's training counts: the continual
setting, paper 1 §4.3) have no learned weight: they are never attended to (n_j > k fails for every
k ≥ 0) and their w_h(k) is their w_hc(k), built from the prototype alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ltdist.kernels.cosine_logits import cosine_logits
from ltdist.kernels.kt_attention import kt_attention
from ltdist.labels import check_label_range


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 3: p_i = mean of f(x)/‖f(x)‖ over the samples of class i, then normalised.

    Args:
        features: [N, F] un-normalised backbone features.
        labels: [N] int class ids in [0, num_classes).
    Returns:
        [num_classes, F] float32 unit rows; a class without any sample gets a zero row.
    """
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"class_prototypes: need features [N, F] and labels [N], got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    check_label_range(labels, num_classes, "class_prototypes: labels")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels.long(), F.normalize(features.double(), dim=1))
    # The mean's 1/n_i does not change the direction; normalising the sum gives p_i/‖p_i‖ directly.
    return F.normalize(sums, dim=1).float()


@dataclass
class KTClassifiers:
    """The classifiers KT derives from one trained model; every matrix holds one class vector per row.

    ``weights`` [C, F] learned classifier rows (cosine or dot-product), ``bias`` [C] or None (dot product),
    ``scale`` the cosine scale s used for every KT classifier's softmax, ``prototypes`` [C, F] unit rows,
    ``w_h`` / ``w_hc`` [K, C, F] for ``ks`` (eqs. 7, 9), ``train_counts`` [C] int64 the dataset's
    training samples per class (the evaluation groups), ``backbone_counts`` [C] int64 those the backbone
    trained on (0: never trained, the continual setting).
    """

    ks: list[int]
    tau: float
    scale: float
    classifier_type: str  # cosine | linear
    weights: torch.Tensor
    bias: torch.Tensor | None
    prototypes: torch.Tensor
    train_counts: torch.Tensor
    backbone_counts: torch.Tensor
    w_h: torch.Tensor
    w_hc: torch.Tensor

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> KTClassifiers:
        return cls(**state)


def build_kt_classifiers(prototypes: torch.Tensor, weights: torch.Tensor, backbone_counts: torch.Tensor,
                         ks: Sequence[int], tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w_h(k) and w_hc(k) for every k in ``ks`` in one pass over the prototype–weight scores.

    Args:
        prototypes: [C, F] class prototypes (eq. 3); every class needs one.
        weights: [C, F] learned classifier weights; rows of untrained classes are ignored.
        backbone_counts: [C] int64 samples per class in the backbone's training (0: never trained).
        ks: thresholds k; the attention covers classes with n_j > k (eq. 6).
        tau: attention temperature τ (eq. 5).
    Returns:
        (w_h, w_hc), each [K, C, F] float32; for untrained classes w_h(k) = w_hc(k).
    Raises:
        ValueError: a class without prototype, or a k at or above every count (from the kernel).
    """
    missing = (prototypes.norm(dim=1) == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"KT: classes {missing} have no prototype (no sample in the prototype split); "
                         f"every class needs at least one")
    counts = backbone_counts.to(torch.int64)
    w_h, w_hc = kt_attention(prototypes.float(), weights.float(), counts, list(ks), float(tau))
    untrained = counts == 0
    w_h[:, untrained] = w_hc[:, untrained]
    return w_h, w_hc


def cosine_probabilities(features: torch.Tensor, class_vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(s · f̂ · v̂ᵀ): features [B, F], class_vectors [C, F] → probabilities [B, C]."""
    logits = cosine_logits(features.float(), class_vectors.float(), torch.tensor(float(scale), device=features.device))
    return torch.softmax(logits.float(), dim=1)


def ensemble_probabilities(features: torch.Tensor, classifiers: Sequence[torch.Tensor],
                           scale: float) -> torch.Tensor:
    """Eq. 8: the mean over classifiers of softmax(s · cos(f, v_i)).

    Args:
        features: [B, F]; classifiers: each [C, F]; scale: the cosine scale s.
    Returns:
        [B, C] probabilities (rows sum to 1).
    """
    if not classifiers:
        raise ValueError("ensemble_probabilities: no classifier to ensemble")
    return torch.stack([cosine_probabilities(features, v, scale) for v in classifiers]).mean(dim=0)
