"""Small PyTorch models for the bundled examples, sized so int8 kernels pay off at batch 1."""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    """8×8 grey digits → 10 classes: four 3×3 conv blocks, one max-pool, global average pool, linear."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(_conv(1, width // 2), _conv(width // 2, width), nn.MaxPool2d(2),
                                      _conv(width, 2 * width), _conv(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class DigitsTransformer(nn.Module):
    """8×8 grey digits read as 8 tokens of 8 pixels → a pre-norm transformer encoder → 10 classes."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.zeros(1, 8, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8)) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))
