"""CIFAR-style ResNets (He et al. 2016, §4.2) for small images: 3 stages of 16/32/64 channels.

Depth 6n + 2 with n basic blocks per stage: resnet8 (n=1, tests), resnet20, 32, 44, 56, 110.
Features: global average pool of the last stage, 64 values.
"""

from __future__ import annotations

import torch
from torch import nn

CIFAR_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Backbone only: ``forward(x [B, C, H, W]) -> features [B, 64]``."""

    def __init__(self, depth: int, channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.blocks_per_stage = n
        self.feature_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def split_last_stage(self) -> tuple[nn.Module, nn.Module]:
        """(everything before the last 64-channel stage, that stage + pooling): modules sharing this
        backbone's parameters, composing to ``forward``."""
        n = self.blocks_per_stage
        prefix = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), *self.layers[:-n])
        return prefix, nn.Sequential(*self.layers[-n:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
