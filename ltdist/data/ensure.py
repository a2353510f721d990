"""Build the configured shards when they are missing (the train stage's entry point to the data)."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from omegaconf import DictConfig

from ltdist.data.build import MIN_TRAIN_SHARDS, build_shards
from ltdist.data.index import read_index

log = logging.getLogger(__name__)
SHARD_SIZE = 256  # small shards: Fashion-MNIST-LT then has 44 train shards for ranks × workers
BUILD_SEED = 0
# Config keys that must agree with the build recorded in index.json, per format.
_LT_KEYS = ("profile", "imbalance", "val_per_class")
_BUILD_KEYS = {"fashion-mnist": _LT_KEYS, "cifar": _LT_KEYS}


def ensure_shards(cfg_data: DictConfig) -> Path:
    """Return ``<cfg.data.shards>/index.json``, building it from cfg.data.format / src / profile /
    imbalance / val_per_class (seed 0) when absent. Safe to call from every rank at once: one process
    builds under a file lock, the others wait and then read its index.

    Existing shards are used as built: a different ``data.format`` is a warning, and the build settings
    are compared only when the formats agree (settings of another format's reader mean nothing there)."""
    out = Path(cfg_data.shards)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "index.json"
        if not path.is_file():
            fmt = cfg_data.format
            if fmt in ("list", "inat2018"):
                raise FileNotFoundError(f"no {path}; build {fmt} shards first with `ltdist shards {fmt} "
                                        f"--src ... --split-file train=... --out {out}`")
            if fmt == "synthetic":
                raise FileNotFoundError(f"no {path}; build synthetic shards first with `ltdist shards synthetic "
                                        f"--classes N --out {out}`")
            log.info("building %s shards in %s", fmt, out)
            build_shards(fmt, cfg_data.src, out, profile=cfg_data.profile, imbalance=float(cfg_data.imbalance),
                         val_per_class=int(cfg_data.val_per_class), seed=BUILD_SEED, shard_size=SHARD_SIZE,
                         progress=False, min_train_shards=MIN_TRAIN_SHARDS)
    index = read_index(path)
    missing = index.missing_files()
    if missing:
        raise FileNotFoundError(f"{path} lists shards that are missing: "
                                + ", ".join(str(p) for p in missing) + f"; delete {out} to rebuild")
    resized = index.resized_files()
    if resized:
        log.warning("shards whose size differs from %s (their damaged samples will be skipped and counted): %s",
                    path, ", ".join(str(p) for p in resized))
    built = index.build
    if built.get("format") != cfg_data.format:
        # The index says how the shards were built; data.format only chooses the reader when building.
        log.warning("%s holds shards built from %r; data.format=%r only matters for building, using them as built",
                    out, built.get("format"), cfg_data.format)
        return path
    diff = {k: (built.get(k), cfg_data[k]) for k in _BUILD_KEYS.get(cfg_data.format, ())
            if built.get(k) != cfg_data[k]}
    if diff:
        raise ValueError(f"{out} was built with different settings (built, config): {diff}; "
                         "point data.shards to another directory or delete it to rebuild")
    return path
