"""The segmentation U-Net of one ensemble member (AtomAI-style, written for this project).

Three 2×2 poolings (so H and W must be multiples of 8), ``base_filters`` doubling per level,
conv → LeakyReLU → BatchNorm blocks, an optional dilated bottleneck whose layers' outputs are summed
(a cheap way to widen the receptive field), bilinear upsampling followed by a 1×1 convolution, skip
connections by concatenation, and a 1×1 head with ``n_classes + 1`` logits (background first).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    n_classes: int = 2            # atom classes; the network has n_classes + 1 outputs (background first)
    base_filters: int = 16
    layers: tuple[int, int, int, int] = (1, 2, 2, 3)   # convs per level; the last is the bottleneck
    dilated_bottleneck: bool = True
    dilations: tuple[int, ...] = (2, 4, 6)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        for key in ("layers", "dilations"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _conv_unit(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation),
        nn.LeakyReLU(0.1),
        nn.BatchNorm2d(c_out),
    )


class ConvBlock(nn.Sequential):
    def __init__(self, n_layers: int, c_in: int, c_out: int):
        super().__init__(*[_conv_unit(c_in if i == 0 else c_out, c_out) for i in range(n_layers)])


class DilatedBlock(nn.Module):
    """Stacked dilated convolutions; the block returns the sum of every layer's output."""

    def __init__(self, c_in: int, c_out: int, dilations: tuple[int, ...]):
        super().__init__()
        self.units = nn.ModuleList(
            _conv_unit(c_in if i == 0 else c_out, c_out, d) for i, d in enumerate(dilations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for unit in self.units:
            x = unit(x)
            total = x if total is None else total + x
        return total


class Upsample(nn.Module):
    """Bilinear ×2 upsampling, then a 1×1 convolution that halves the channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))


class UNet(nn.Module):
    """Input ``[B, 1, H, W]`` (H, W multiples of 8) → logits ``[B, n_classes + 1, H, W]``."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        f, (l1, l2, l3, l4) = cfg.base_filters, cfg.layers
        self.enc1 = ConvBlock(l1, 1, f)
        self.enc2 = ConvBlock(l2, f, 2 * f)
        self.enc3 = ConvBlock(l3, 2 * f, 4 * f)
        self.bottleneck = (DilatedBlock(4 * f, 8 * f, cfg.dilations) if cfg.dilated_bottleneck
                           else ConvBlock(l4, 4 * f, 8 * f))
        self.up3, self.dec3 = Upsample(8 * f, 4 * f), ConvBlock(l3, 8 * f, 4 * f)
        self.up2, self.dec2 = Upsample(4 * f, 2 * f), ConvBlock(l2, 4 * f, 2 * f)
        self.up1, self.dec1 = Upsample(2 * f, f), ConvBlock(l1, 2 * f, f)
        self.head = nn.Conv2d(f, cfg.n_classes + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottleneck(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def atom_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over background + classes, background dropped: ``[B, C, H, W]``."""
    return torch.softmax(logits, dim=1)[:, 1:]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
