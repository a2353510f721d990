"""A synthetic run directory for stage-2 tests: a real model export and constructed features.

Classes have unit-norm centres; features are 6·centre + N(0, I). The exported head is biased towards the
classes it saw most (rare rows are noisy), as a long-tail head is.
"""

import torch
import torch.nn.functional as F

from ltdist.config import load_config
from ltdist.distributed import DistEnv
from ltdist.models import build_model, export_model
from ltdist.rundir import features_path
from ltdist.stages import StageContext

TRAIN_COUNTS = [300, 150, 60, 25, 8, 3]  # many: 0-1, medium: 2-3, few: 4-5 (thresholds 100 / 20)
FEATURE_DIM = 64  # resnet20's


def feature_split(centres: torch.Tensor, counts: list[int], gen: torch.Generator) -> dict:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    features = 6 * centres[labels] + torch.randn(len(labels), centres.shape[1], generator=gen)
    return {"features": features, "labels": labels, "keys": [f"s{i:05d}" for i in range(len(labels))]}


def make_run_dir(path, classifier: str = "cosine", splits: dict[str, list[int]] | None = None):
    """Write features/{train,val,test}.pt and weights/final.pt under ``path``; return ``path``."""
    splits = splits or {"train": TRAIN_COUNTS, "val": [4] * 6, "test": [40] * 6}
    gen = torch.Generator().manual_seed(0)
    num_classes = len(splits["train"])
    centres = F.normalize(torch.randn(num_classes, FEATURE_DIM, generator=gen), dim=1)
    for split, counts in splits.items():
        target = features_path(path, split)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feature_split(centres, counts, gen), target)
    model = build_model("resnet20", num_classes=num_classes, channels=1, classifier=classifier)
    with torch.no_grad():
        spread = torch.linspace(0.1, 3.0, num_classes)[:, None]
        noise = torch.randn(num_classes, FEATURE_DIM, generator=gen) * spread
        model.classifier.weight.copy_(centres + noise / FEATURE_DIM**0.5)
    export_model(model, path / "weights" / "final.pt")
    return path


def stage_context(run_dir, *overrides: str) -> StageContext:
    """A one-rank CPU context with the default config plus ``overrides``."""
    cfg = load_config(overrides=["data.name=synthetic", *overrides])
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, master_addr="127.0.0.1",
                  master_port=0, backend="gloo", device=torch.device("cpu"), hostname="localhost")
    return StageContext(cfg=cfg, run_dir=run_dir, dist=env)
