"""What the data decide about classes: which are withheld from training, and config values only the data
can check (class ids in range, every evaluation group populated, every trained class with samples).

The train stage calls :func:`check_against_data` before it builds anything, so a bad value stops the run
with a message that names its config key instead of a traceback from inside the stream or the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig

from ltdist.class_groups import class_groups
from ltdist.data.index import LongTailIndex

log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """Config values that contradict the data; the message lists every problem, each naming its key."""


def excluded_classes(exclude: Any, train_counts: Sequence[int], few_threshold: int) -> list[int]:
    """Class ids withheld from backbone training (``data.exclude_from_training``), sorted.

    Args:
        exclude: None (no class), "few" (every class with n < few_threshold) or a list of class ids.
        train_counts: [C] the dataset's training counts.
    """
    if exclude is None:
        return []
    counts = [int(n) for n in train_counts]
    if exclude == "few":
        return [c for c, n in enumerate(counts) if n < few_threshold]
    if isinstance(exclude, str) or not all(isinstance(c, int) and not isinstance(c, bool) for c in exclude):
        raise ValueError(f"data.exclude_from_training: must be null, 'few' or a list of integer class ids, "
                         f"got {exclude!r}")
    ids = sorted(set(exclude))
    bad = [c for c in ids if not 0 <= c < len(counts)]
    if bad:
        raise ValueError(f"data.exclude_from_training: class ids {bad} outside [0, {len(counts)}): the shards "
                         f"have {len(counts)} classes")
    return ids


def has_val(index: LongTailIndex) -> bool:
    """Whether the shards hold a non-empty val split (see :func:`ltdist.data.build.carve_val`)."""
    return "val" in index.manifest and sum(index.counts["val"]) > 0


def _group_problems(counts: list[int], many: int, few: int) -> list[str]:
    groups = class_groups(counts, many, few)
    empty = [name for name, ids in groups.items() if not ids]
    if not empty:
        return []
    ordered = sorted(counts, reverse=True)
    return [f"evaluate.many_threshold={many} / evaluate.few_threshold={few}: the {', '.join(empty)} group(s) "
            f"would be empty for these training counts (largest {ordered[:3]}, smallest {ordered[-3:]}); "
            f"many-shot is n > many_threshold, few-shot n < few_threshold: pick thresholds between the counts"]


def check_against_data(cfg: DictConfig, index: LongTailIndex, needs_val: Mapping[str, str] | None = None) -> list[int]:
    """Check the config values that only the data can check; return the excluded class ids.

    ``needs_val``: the run's settings that need a val split, ``{"key=value": the alternative to suggest}``
    (the stages say which: :func:`ltdist.stages.kt.val_split_needs`). Raises :class:`DataConfigError` listing
    every problem (each names its key). Logs one warning when the shards have no val split: training then
    runs without per-epoch validation.
    """
    counts = [int(n) for n in index.train_counts]
    problems: list[str] = []
    excluded: list[int] = []
    try:
        excluded = excluded_classes(cfg.data.exclude_from_training, counts, cfg.evaluate.few_threshold)
    except ValueError as e:
        problems.append(str(e))
    empty = [j for j, n in enumerate(counts) if n == 0 and j not in excluded]
    if empty:
        names = ", ".join(f"{j} ({index.classes[j]!r})" for j in empty[:10])
        problems.append(f"data.shards={cfg.data.shards}: classes {names} have 0 training samples; remove them from "
                        f"the data, or list them in data.exclude_from_training to train without them")
    if excluded and len(excluded) == len(counts):
        problems.append(f"data.exclude_from_training={cfg.data.exclude_from_training!r}: withholds every class")
    problems += _group_problems(counts, cfg.evaluate.many_threshold, cfg.evaluate.few_threshold)
    if not has_val(index):
        for setting, alternative in (needs_val or {}).items():
            problems.append(f"{setting}: the shards in {cfg.data.shards} have no val split (rebuild them with "
                            f"data.val_per_class > 0, or use {alternative})")
        log.warning("the shards in %s have no val split: training runs without per-epoch validation (rebuild "
                    "them with data.val_per_class > 0 to carve one from train)", cfg.data.shards)
    if problems:
        raise DataConfigError("config values that do not fit the data in " + str(index.root / "index.json")
                              + ":\n  - " + "\n  - ".join(problems))
    return excluded
