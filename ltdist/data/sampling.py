"""Class-rebalancing by per-sample repeat factors (README.md, "How it works: Sampling in a stream").

Target class probability q_j ∝ n_j^p (p = 1 instance, 0.5 square root, 0 class balanced). Each
sample of class j is emitted floor(r_j) + Bernoulli(frac(r_j)) times with r_j = q_j · N / n_j, so the
expected number of emissions of class j per pass is n_j · r_j = q_j · N: exactly q_j of the N
samples a pass is expected to emit.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def class_probabilities(counts: Sequence[int], power: float, exclude: Sequence[int] = ()) -> np.ndarray:
    """q_j ∝ n_j^power over the classes with samples that are not excluded; 0 elsewhere. Shape [C]."""
    n = np.asarray(counts, dtype=np.float64)
    active = n > 0
    active[list(exclude)] = False
    if not active.any():
        raise ValueError("no class has training samples after exclusions")
    q = np.zeros_like(n)
    q[active] = n[active] ** power
    return q / q.sum()


def repeat_factors(counts: Sequence[int], power: float, exclude: Sequence[int] = ()) -> np.ndarray:
    """r_j = q_j · N / n_j with N = Σ_{active} n_j (0 for excluded / empty classes). Shape [C]."""
    n = np.asarray(counts, dtype=np.float64)
    q = class_probabilities(counts, power, exclude)
    total = n[q > 0].sum()
    r = np.zeros_like(n)
    r[q > 0] = q[q > 0] * total / n[q > 0]
    return r


def draw_repeats(factor: float, rng: random.Random) -> int:
    """floor(r) + Bernoulli(frac(r)): an integer with expectation exactly r."""
    whole = math.floor(factor)
    return whole + (rng.random() < factor - whole)


def warn_empty_classes(counts: Sequence[int], classes: Sequence[str]) -> list[int]:
    """Log and return the classes with zero training samples (they can never be emitted)."""
    empty = [j for j, n in enumerate(counts) if n == 0]
    if empty:
        log.warning("classes with zero training samples (never emitted): %s",
                    ", ".join(f"{j} ({classes[j]})" for j in empty))
    return empty
