"""ImageNet-scale bottleneck ResNets / ResNeXt (He et al. 2016; Xie et al. 2017), torchvision layout.

resnet50/101/152 and resnext50_32x4d; features: global average pool of stage 4, 2048 values.
Written here because torchvision is not installable on the CPU-only machines we target.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

# arch -> (blocks per stage, groups, width per group)
IMAGENET_SPECS = {
    "resnet50": ((3, 4, 6, 3), 1, 64),
    "resnet101": ((3, 4, 23, 3), 1, 64),
    "resnet152": ((3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
}


_TORCHVISION_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.*)$")
_TORCHVISION_STEM = {"conv1.": "stem.0.", "bn1.": "stem.1."}


def from_torchvision_keys(state: Mapping[str, torch.Tensor], blocks: Sequence[int]) -> dict[str, torch.Tensor]:
    """A state dict in torchvision's ResNet key layout renamed to :class:`ImageNetResNet`'s.

    torchvision names the stem ``conv1`` / ``bn1`` and the blocks ``layer<s>.<b>``; here the stem is
    ``stem.0`` / ``stem.1`` and the blocks of all four stages are one sequence ``stages.<i>`` with
    i = Σ_{t<s} blocks[t] + b. Names inside a block (``conv1``…``bn3``, ``downsample.0/1``) are the same.
    Keys that do not map (``fc.*``, a block past ``blocks[s]``) keep their names, for the strict check to
    report."""
    offsets = [sum(blocks[:s]) for s in range(len(blocks))]
    renamed = {}
    for key, value in state.items():
        m = _TORCHVISION_BLOCK.match(key)
        if m and int(m.group(2)) < blocks[int(m.group(1)) - 1]:
            key = f"stages.{offsets[int(m.group(1)) - 1] + int(m.group(2))}.{m.group(3)}"
        else:
            key = next((new + key[len(old):] for old, new in _TORCHVISION_STEM.items() if key.startswith(old)), key)
        renamed[key] = value
    return renamed


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int, base_width: int):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        # Zero-init the last BN so each block starts as identity (Goyal et al. 2017): stabler large-batch start.
        nn.init.zeros_(self.bn3.weight)
        self.downsample = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes * self.expansion, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ImageNetResNet(nn.Module):
    """Backbone only: ``forward(x [B, C, H, W]) -> features [B, 2048]``."""

    def __init__(self, arch: str, channels: int = 3):
        super().__init__()
        blocks, groups, base_width = IMAGENET_SPECS[arch]
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, in_planes = [], 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(Bottleneck(in_planes, planes, stride, groups, base_width))
                in_planes = planes * Bottleneck.expansion
        self.stages = nn.Sequential(*stages)
        self.blocks_per_stage = blocks
        self.last_stage_blocks = blocks[-1]
        self.feature_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def split_last_stage(self) -> tuple[nn.Module, nn.Module]:
        """(stem + stages 1–3, stage 4 + pooling): modules sharing this backbone's parameters."""
        n = self.last_stage_blocks
        prefix = nn.Sequential(self.stem, *self.stages[:-n])
        return prefix, nn.Sequential(*self.stages[-n:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
