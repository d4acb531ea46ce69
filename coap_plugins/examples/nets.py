"""Small vision networks for the examples, the quality tests and the LightningCLI recipe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "SmallCNN", "SmallResNet"]


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    The shortcut is the identity when shape is kept, else a strided 1x1 conv with BN.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        stride: stride of the first conv and of the shortcut (default 1).
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut: nn.Module
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chans),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A compact ResNet for small images: a 3x3 stem, one stage per width, a linear head.

    The first stage keeps the resolution, every later stage halves it (stride 2).  With the
    default widths the 3x3 convs of the later stages (64x32x3x3 and up) are above COAP's default
    ``min_conv_numel`` of 9216 elements, so they get Tucker-2 projectors; the stem, the first
    stage (32x32x3x3 = 9216), the 1x1 shortcuts and the head ``fc`` stay full rank by default.

    Args:
        in_chans: input channels (default 1).
        num_classes: outputs of the head (default 10).
        widths: channels of each stage (default (32, 64, 128)).
        blocks_per_stage: basic blocks per stage (default 1).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("Invalid widths: empty (give at least one stage width)")
        if blocks_per_stage < 1:
            raise ValueError(f"Invalid blocks_per_stage: {blocks_per_stage!r} (must be >= 1)")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        prev = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(prev, width, stride))
                prev = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallCNN(nn.Module):
    """A fast three-conv network for tests: convs 1->32->64->64, a hidden linear, a linear head.

    Layout: conv3x3(in, 32)-BN-ReLU-maxpool, conv3x3(32, 64)-BN-ReLU-maxpool,
    conv3x3(64, 64)-BN-ReLU, adaptive average pool to 2x2, ``fc1`` (256 -> hidden) with ReLU,
    and the head ``fc``.  Only the 64x32x3x3 and 64x64x3x3 convs pass COAP's default
    ``min_conv_numel``; pass a smaller one to project the first conv too.

    Args:
        in_chans: input channels (default 1).
        num_classes: outputs of the head (default 10).
        hidden: width of the hidden linear layer (default 128).
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 2 * 2, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc(F.relu(self.fc1(x)))
