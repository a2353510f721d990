"""Paths in the run directory that several layers share, and the loader of the extracted features.

``weights/final.pt`` is the train stage's model export (the trainer writes it, :func:`ltdist.models.export_model`;
extract, the stage-2 methods and evaluate read it); ``features/<split>.pt`` is the extract stage's output
for one split, read by every stage-2 method and by evaluate (:mod:`ltdist.stages.extract` has the format).
"""

from __future__ import annotations

from pathlib import Path

import torch


def features_path(run_dir: Path, split: str) -> Path:
    return run_dir / "features" / f"{split}.pt"


def model_path(run_dir: Path) -> Path:
    """The train stage's export (``ltdist.models.export_model``)."""
    return run_dir / "weights" / "final.pt"


def load_features(run_dir: Path, split: str) -> dict:
    """``{"features": [N, F] float32, "labels": [N] int64, "keys": list[str]}`` of one split."""
    path = features_path(run_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the extract stage first (stages=[extract,...]); extract "
                                f"skips a split the shards do not have (see index.json)")
    return torch.load(path, map_location="cpu", weights_only=True)
