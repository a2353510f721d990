"""Backbones (CIFAR ResNets, ImageNet ResNets/ResNeXt, optional timm/torchvision) and classifier heads."""

from ltdist.models.build import LongTailModel, build_model, export_model, load_exported_model
from ltdist.models.classifiers import CosineClassifier, LinearClassifier

__all__ = ["CosineClassifier", "LinearClassifier", "LongTailModel", "build_model", "export_model",
           "load_exported_model"]
