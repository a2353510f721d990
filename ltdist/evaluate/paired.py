"""Paired-over-seeds differences between two methods, with a Student-t interval, and the verdict they allow.

Method A and method B were run with the same seeds (seed s of A and seed s of B share the data order of
the sampler and the initial weights where the backbones agree), so the per-seed differences d_s = A_s − B_s
remove the noise the two share. The interval is mean(d) ± t_{0.975, n−1} · sd(d) / √n (95 %, two-sided).
A claim "A > B" holds when the whole interval is above 0; an interval that contains 0 is a tie; fewer than
two common seeds give no interval and no verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

# Two-sided 95 % quantiles t_{0.975, df} of Student's t (df 1 … 30); past 30 the normal quantile is used,
# which understates the interval by < 4 % at df 31.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
Z975 = 1.960


def t975(df: int) -> float:
    """t_{0.975, df}: the half-width multiplier of a two-sided 95 % interval with ``df`` ≥ 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be ≥ 1, got {df}")
    return T975[df - 1] if df <= len(T975) else Z975


@dataclass(frozen=True)
class PairedDifference:
    """A − B over the seeds both have, in the units of the inputs (fractions of test samples here).

    ``low``/``high`` are None with fewer than two common seeds.
    """

    a: str
    b: str
    column: str
    seeds: tuple[int, ...]
    mean: float
    low: float | None
    high: float | None

    @property
    def verdict(self) -> str:
        """">" (A beats B), "<" (B beats A), "tie" (the interval contains 0) or "n/a" (no interval)."""
        if self.low is None or self.high is None:
            return "n/a"
        return ">" if self.low > 0 else "<" if self.high < 0 else "tie"

    def sentence(self) -> str:
        """The claim in words, in percentage points (e.g. "cRT > NCM (all): cRT − NCM = +1.2 points, …")."""
        words = {">": f"{self.a} > {self.b}", "<": f"{self.b} > {self.a}", "tie": f"{self.a} ties {self.b}",
                 "n/a": f"{self.a} vs {self.b}: no verdict (fewer than 2 common seeds)"}[self.verdict]
        interval = ("" if self.low is None
                    else f", 95 % CI [{100 * self.low:+.1f}, {100 * self.high:+.1f}]")
        return (f"{words} ({self.column}): {self.a} − {self.b} = {100 * self.mean:+.1f} points{interval}, "
                f"{len(self.seeds)} seeds")

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "column": self.column, "seeds": list(self.seeds), "mean": self.mean,
                "low": self.low, "high": self.high, "verdict": self.verdict, "text": self.sentence()}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *, a_name: str, b_name: str,
                      column: str) -> PairedDifference:
    """A − B paired by seed: ``a``/``b`` map seed → value; only the seeds both have are used."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"{a_name} vs {b_name}: no seed in common (A has {sorted(a)}, B has {sorted(b)})")
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(a_name, b_name, column, seeds, mean, None, None)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(a_name, b_name, column, seeds, mean, mean - half, mean + half)
