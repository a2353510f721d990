"""Build a backbone + classifier by name, export plain fp32 weights, load them back for later stages."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

from ltdist.fileio import torch_save_atomic
from ltdist.models.classifiers import CosineClassifier, LinearClassifier
from ltdist.models.resnet_cifar import CIFAR_DEPTHS, CifarResNet
from ltdist.models.resnet_imagenet import IMAGENET_SPECS, ImageNetResNet

EXPORT_FORMAT = "ltdist-model-v1"
CLASSIFIERS = ("cosine", "linear")


def _external_backbone(arch: str, channels: int, pretrained: bool = False) -> tuple[nn.Module, int]:
    """``timm:<name>`` or ``torchvision:<name>``, headless, when that library is installed; ``pretrained``:
    with the library's own ImageNet weights (it fetches them: network or its cache)."""
    library, name = arch.split(":", 1)
    try:
        module = importlib.import_module(library)
    except ImportError as e:
        raise ValueError(f"model.arch={arch!r} needs the optional package {library!r}, which is not installed") from e
    if library == "timm":
        net = module.create_model(name, pretrained=pretrained, num_classes=0, in_chans=channels)
        return net, int(net.num_features)
    if channels != 3:
        raise ValueError(f"model.arch={arch!r}: torchvision backbones take 3 channels, data has {channels}")
    net = getattr(module.models, name)(weights="DEFAULT" if pretrained else None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, int(feature_dim)


def _backbone(arch: str, channels: int, pretrained: bool = False) -> tuple[nn.Module, int]:
    if arch in CIFAR_DEPTHS:
        net = CifarResNet(CIFAR_DEPTHS[arch], channels)
        return net, net.feature_dim
    if arch in IMAGENET_SPECS:
        net = ImageNetResNet(arch, channels)
        return net, net.feature_dim
    if arch.startswith(("timm:", "torchvision:")):
        return _external_backbone(arch, channels, pretrained)
    known = ", ".join([*CIFAR_DEPTHS, *IMAGENET_SPECS, "timm:<name>", "torchvision:<name>"])
    raise ValueError(f"unknown model.arch {arch!r}; choose one of {known}")


class LongTailModel(nn.Module):
    """Backbone + classifier. ``forward(x [B, C, H, W]) -> logits [B, num_classes]``; with
    ``return_features=True`` → (logits, un-normalised features [B, feature_dim]) from one pass."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, feature_dim: int, spec: dict):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.feature_dim = feature_dim
        self.spec = spec  # the build_model arguments, so an export can rebuild the same module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised backbone features [B, feature_dim]."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.backbone(x)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits


def build_model(arch: str, num_classes: int, channels: int, classifier: str = "cosine", scale_init: float = 16.0,
                learn_scale: bool = True, pretrained: bool = False) -> LongTailModel:
    """A fresh model; parameters are drawn from torch's global RNG (seed it for identical ranks).

    ``pretrained`` (timm:/torchvision: backbones): the library's own weights; an export does not record it,
    since its state dict holds the weights."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"model.classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    backbone, feature_dim = _backbone(arch, channels, pretrained)
    if classifier == "cosine":
        head: nn.Module = CosineClassifier(feature_dim, num_classes, scale_init, learn_scale)
    else:
        head = LinearClassifier(feature_dim, num_classes)
    spec = dict(arch=arch, num_classes=num_classes, channels=channels, classifier=classifier,
                scale_init=scale_init, learn_scale=learn_scale)
    return LongTailModel(backbone, head, feature_dim, spec)


def export_model(model: LongTailModel, path: str | os.PathLike, overrides: dict | None = None) -> Path:
    """Write plain fp32 CPU weights plus the build arguments atomically (temp file, fsync, rename).

    ``overrides`` replaces entries of the model's state dict (e.g. the fp32 master weights of a bf16 run).
    """
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
             for k, v in {**model.state_dict(), **(overrides or {})}.items()}
    return torch_save_atomic({"format": EXPORT_FORMAT, "spec": model.spec, "feature_dim": model.feature_dim,
                              "state_dict": state}, path)


def load_exported_model(path: str | os.PathLike) -> LongTailModel:
    """The model written by :func:`export_model`, in eval mode on CPU."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an ltdist model export (expected format {EXPORT_FORMAT!r})")
    model = build_model(**payload["spec"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
