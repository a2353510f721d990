"""KT's τ and set of k chosen on val, beside paper 1's fixed choice (τ = 10, k ∈ {0, 20, 100}).

Paper 1 (§3.2, eq. 8) fixes the attention temperature τ and the thresholds k of the ensemble. Here every
τ of ``method.kt.tau_grid`` (plus the fixed τ) and every non-empty subset of ``method.kt.ks`` is a
candidate; the ensemble with the best mean per-class top-1 on val wins (ties: the paper's choice, then
the order of the grid). The result, ``classifiers/kt_val.pt``, holds the chosen w_h(k) rows as cosine
scorers with the KT scale s and their ensemble; ``evaluate`` reports it beside the KT file's ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch

from ltdist.methods.classifier_set import ClassifierSet, LinearScorer, select_on_val
from ltdist.methods.kt import KTClassifiers, build_kt_classifiers

FILE = "kt_val"  # classifiers/kt_val.pt


@dataclass
class ProbabilityEnsemble:
    """Eq. 8 as a scorer: log of the mean softmax probability of ``members`` (same argmax as the mean)."""

    members: Sequence[LinearScorer]

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F] → [B, C] log mean probabilities."""
        probs = torch.stack([torch.softmax(m.scores(features), dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-30).log()


def k_subsets(ks: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``ks``, the full set first (paper 1's choice), then by size, largest first."""
    ks = sorted(ks)
    return [subset for size in range(len(ks), 0, -1) for subset in combinations(ks, size)]


def select_kt_on_val(kt: KTClassifiers, val: dict | None, tau_grid: Sequence[float],
                     device: torch.device | str = "cpu") -> ClassifierSet:
    """Choose (τ, k set) of the w_h ensemble on ``val`` (None: keep the paper's fixed choice).

    ``kt`` is the KT file built with the fixed τ and ``kt.ks``; w_h(k) is rebuilt here for every τ.
    Returns the ``kt_val`` set: rows "KT-val w_h(k)" for the chosen k and the ensemble "KT-val ensemble".
    """
    fixed = (float(kt.tau), tuple(kt.ks))
    taus = [fixed[0], *(float(t) for t in tau_grid if float(t) != fixed[0])]
    scorers: dict[tuple[float, int], LinearScorer] = {}
    for tau in taus:
        w_h, _ = build_kt_classifiers(kt.prototypes.to(device), kt.weights.to(device), kt.backbone_counts.to(device),
                                      kt.ks, tau)
        for i, k in enumerate(kt.ks):
            scorers[(tau, k)] = LinearScorer("cosine", w_h[i].cpu(), scale=kt.scale)
    candidates = {(tau, subset): ProbabilityEnsemble([scorers[(tau, k)] for k in subset])
                  for tau in taus for subset in k_subsets(kt.ks)}
    (tau, subset), accuracy, note = select_on_val(candidates, val, fixed, "(τ, k set)")
    rows = {f"KT-val w_h({k})": scorers[(tau, k)] for k in subset}
    chosen = {"tau": tau, "ks": list(subset), "paper": {"tau": fixed[0], "ks": list(fixed[1])},
              "val_accuracy": accuracy}
    paper = f"paper 1's fixed choice τ = {fixed[0]:g}, k ∈ {list(fixed[1])} is the KT file's 'ensemble' row"
    if val is not None:
        paper += f" (val mean per-class top-1 {100 * accuracy[str(fixed)]:.1f} %)"
    return ClassifierSet(FILE, rows, ensembles={"KT-val ensemble": list(rows)}, chosen=chosen, notes=[note, paper])
