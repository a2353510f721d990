"""Pretrained backbone weights: read a weights file safely and load it into a backbone, strictly.

Accepted files (``torch.load(weights_only=True)``, nothing is unpickled with arbitrary code): a raw state dict
(torchvision's published ``.pth`` files), ``{"state_dict": ...}`` (an ltdist ``weights/final.pt`` and most
training scripts) or ``{"model": ...}``. Key names are normalised before the strict match:

- a ``module.`` prefix on every key (a DistributedDataParallel checkpoint) is removed;
- an ltdist export's ``backbone.`` prefix is removed and its ``classifier.*`` head set aside;
- torchvision's ResNet layout (``conv1``, ``bn1``, ``layer1.0.downsample.0``, ...) is renamed to ltdist's
  (:func:`ltdist.models.resnet_imagenet.from_torchvision_keys`) when the backbone is an ltdist ResNet.

Keys the backbone does not have under a classifier-head prefix (``fc.``, ``classifier.``, ``head.``) are the
old task's head: dropped and named in the log (the long-tail head is new). Every other key must match by name
and shape, or :class:`WeightsMismatchError` lists what is missing, unexpected and of the wrong shape.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ltdist.data.index import file_sha256
from ltdist.fileio import write_atomic
from ltdist.models.build import LongTailModel, build_model
from ltdist.models.resnet_imagenet import ImageNetResNet, from_torchvision_keys

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("fc.", "classifier.", "head.")
RECORD_FILE = "source.json"  # in the run directory's weights/: what the backbone started from
_LISTED = 12  # names shown per kind of mismatch
# Where the Places-LT protocol's weights come from (model.weights of configs/experiment/places_lt.yaml).
TORCHVISION_RESNET152 = "https://download.pytorch.org/models/resnet152-394f9c45.pth"


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the backbone; the message lists the keys at fault."""


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a raw state dict, or the one under ``"state_dict"`` or ``"model"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: no file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated file, not a torch file at all
        raise ValueError(f"model.weights: {path} is not a weights file torch.load(weights_only=True) accepts: "
                         f"{str(e).splitlines()[0]}") from None
    if isinstance(payload, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), Mapping):
                payload = payload[key]
                break
    if not isinstance(payload, Mapping) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise ValueError(f"model.weights: {path} holds no state dict (a mapping of names to tensors, raw or under "
                         "'state_dict' or 'model')")
    return dict(payload)


def _normalised_keys(backbone: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # an ltdist export: backbone.* + classifier.*
        state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    if isinstance(backbone, ImageNetResNet) and "conv1.weight" in state:
        state = from_torchvision_keys(state, backbone.blocks_per_stage)
    return state


def _listed(names: list[str]) -> str:
    more = f", … and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def load_backbone_state(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``backbone`` strictly (in place), after the key normalisation of this module.

    ``source`` names the weights in messages (a path). BatchNorm ``num_batches_tracked`` counters missing from
    old files (torchvision's published ResNets predate them) keep the backbone's values. Raises
    :class:`WeightsMismatchError` listing missing / unexpected / shape-mismatched keys.
    """
    state = _normalised_keys(backbone, state)
    own = backbone.state_dict()
    head = sorted(k for k in state if k not in own and k.startswith(HEAD_PREFIXES))
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own and k not in head)
    shapes = sorted(f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the backbone"
                    for k, v in own.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the {type(backbone).__name__} backbone ({len(own)} tensors; "
                 f"{len(state)} in the file after renaming)"]
        for what, names in (("missing from the file", missing), ("unexpected in the file", unexpected),
                            ("shape mismatch", shapes)):
            if names:
                lines.append(f"{len(names)} {what}: {_listed(names)}")
        if any(k.endswith("conv1.weight") or k.startswith("stem.0.") for k in shapes):
            lines.append("a first-layer shape mismatch usually means data.channels differs from the channels "
                         "the weights were trained on (3 for ImageNet)")
        raise WeightsMismatchError("\n  ".join(lines))
    if head:
        log.info("weights %s: the file's classifier head is not loaded (the long-tail head is new): %s", source,
                 _listed(head))
    merged = {k: state.get(k, v) for k, v in own.items()}
    backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in merged.items()}, strict=True)


def load_pretrained(model: LongTailModel, weights: str) -> dict:
    """Load the backbone of ``model`` from the file ``weights``;
    return the record to keep with the run: ``{"path", "sha256"}``."""
    path = Path(weights).absolute()
    load_backbone_state(model.backbone, load_weights_file(path), str(path))
    record = {"path": str(path), "sha256": file_sha256(path)}
    log.info("backbone weights loaded from %s (sha256 %s)", path, record["sha256"])
    return record


def build_configured_model(model_cfg, num_classes: int, channels: int) -> tuple[LongTailModel, dict | None]:
    """The model of the ``model`` config section: :func:`~ltdist.models.build_model`, then the backbone's
    weights from ``model.weights`` (or the library's own with ``model.pretrained``). Returns the model and
    the record of where its weights came from (None: random initialisation)."""
    model = build_model(model_cfg.arch, num_classes, channels, model_cfg.classifier, model_cfg.scale_init,
                        model_cfg.learn_scale, pretrained=bool(model_cfg.pretrained))
    if model_cfg.weights:
        return model, load_pretrained(model, model_cfg.weights)
    if model_cfg.pretrained:
        return model, {"path": None, "sha256": None, "pretrained": model_cfg.arch}
    return model, None


def write_weights_record(weights_dir: Path, record: dict) -> Path:
    """``weights_dir/source.json``: what the backbone's weights were loaded from."""
    return write_atomic(weights_dir / RECORD_FILE, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))


def read_weights_record(weights_dir: Path) -> dict | None:
    """The record :func:`write_weights_record` wrote, or None when the backbone started from scratch."""
    path = weights_dir / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def missing_weights_message(weights: str, arch: str) -> str | None:
    """At launch: None when ``model.weights`` is empty or names a file, else what to do about it."""
    if not weights or Path(weights).is_file():
        return None
    hint = "; point model.weights at a state dict file (README.md, \"Starting from pretrained weights\")"
    if arch == "resnet152":
        hint = (f"; the Places-LT protocol starts from torchvision's ImageNet ResNet-152, "
                f"{TORCHVISION_RESNET152.rsplit('/', 1)[1]}: download {TORCHVISION_RESNET152} to that path, or set "
                "model.weights=PATH")
    return f"model.weights: no file at {weights}{hint}"
