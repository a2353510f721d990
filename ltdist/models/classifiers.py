"""Classifier heads on top of backbone features: cosine (paper 1, eqs. 1–2) and dot-product linear."""

from __future__ import annotations

import math

import torch
from torch import nn

from ltdist.kernels.cosine_logits import cosine_logits


class CosineClassifier(nn.Module):
    """logits_i = s · (f/‖f‖) · (w_i/‖w_i‖) with a learnable (or fixed) scale s, initialised at 16.

    ``weight`` [C, F] holds one class centre per row; ``scale`` holds s as a 1-element tensor [1]
    (a parameter when learnt; not 0-d because DeepSpeed broadcasts parameters through a byte view).
    """

    def __init__(self, feature_dim: int, num_classes: int, scale_init: float = 16.0, learn_scale: bool = True):
        super().__init__()
        if scale_init <= 0:
            raise ValueError(f"cosine classifier scale_init must be > 0, got {scale_init}")
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        scale = torch.tensor([float(scale_init)])
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F] → logits [B, C]; Triton kernel on CUDA, the kernel's reference elsewhere."""
        return cosine_logits(features, self.weight, self.scale)


class LinearClassifier(nn.Linear):
    """Dot-product classifier logits = f Wᵀ + b (the paper 1 Table 4a baseline); weight [C, F], bias [C]."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
