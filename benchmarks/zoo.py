"""A zoo of common architectures written in torch (no torchvision here), with random weights whose
BatchNorm statistics are set on synthetic data so activations have trained-like ranges.

Each entry builds (module, example inputs, input names, sample generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


# --- ResNet-18 -------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


# --- MobileNetV2 -----------------------------------------------------------------------------------------
def _conv_bn(cin, cout, k, stride, groups=1, act=nn.ReLU6):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act() if act else nn.Identity())


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=False):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [_conv_bn(cin, hidden, 1, 1, act=act)] if expand != 1 else []
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, max(1, cin // 4)))
        layers.append(_conv_bn(hidden, cout, 1, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, classes=1000):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


# --- EfficientNet-like (SiLU, squeeze-excite) -----------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class EfficientNetB0(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 40, 2, 2), (6, 80, 3, 2), (6, 112, 3, 1), (6, 192, 4, 2),
                (6, 320, 1, 1))

    def __init__(self, classes=1000):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, 3, 2, act=nn.SiLU)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, act=nn.SiLU, se=True))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


# --- transformers ------------------------------------------------------------------------------------------
def _encoder(dim, depth, heads, mlp):
    layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ViTTiny(nn.Module):
    def __init__(self, image=224, patch=16, dim=192, depth=12, heads=3, classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.encoder = _encoder(dim, depth, heads, dim * 4)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class BertSmall(nn.Module):
    def __init__(self, vocab=8000, seq=128, dim=512, depth=8, heads=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.encoder = _encoder(dim, depth, heads, dim * 4)
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids):
        h = self.encoder(self.norm(self.embed(ids) + self.pos))
        return torch.tanh(self.pool(h[:, 0]))


# --- YOLO-style detector (SiLU, Split, Concat, Resize) ----------------------------------------------------
class C2f(nn.Module):
    def __init__(self, cin, cout, n=1):
        super().__init__()
        self.hidden = cout // 2
        self.cv1 = _conv_bn(cin, 2 * self.hidden, 1, 1, act=nn.SiLU)
        self.blocks = nn.ModuleList(nn.Sequential(_conv_bn(self.hidden, self.hidden, 3, 1, act=nn.SiLU),
                                                  _conv_bn(self.hidden, self.hidden, 3, 1, act=nn.SiLU))
                                    for _ in range(n))
        self.cv2 = _conv_bn((2 + n) * self.hidden, cout, 1, 1, act=nn.SiLU)

    def forward(self, x):
        parts = list(self.cv1(x).split(self.hidden, dim=1))
        for block in self.blocks:
            parts.append(parts[-1] + block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class YoloStyle(nn.Module):
    def __init__(self, classes=20, width=32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn(3, w, 3, 2, act=nn.SiLU), _conv_bn(w, 2 * w, 3, 2, act=nn.SiLU),
                                  C2f(2 * w, 2 * w))
        self.p3 = nn.Sequential(_conv_bn(2 * w, 4 * w, 3, 2, act=nn.SiLU), C2f(4 * w, 4 * w, 2))
        self.p4 = nn.Sequential(_conv_bn(4 * w, 8 * w, 3, 2, act=nn.SiLU), C2f(8 * w, 8 * w, 2))
        self.p5 = nn.Sequential(_conv_bn(8 * w, 8 * w, 3, 2, act=nn.SiLU), C2f(8 * w, 8 * w))
        self.up4 = C2f(16 * w, 8 * w)
        self.up3 = C2f(12 * w, 4 * w)
        self.heads = nn.ModuleList(nn.Conv2d(c, 4 + classes, 1) for c in (4 * w, 8 * w, 8 * w))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.up4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], dim=1))
        n3 = self.up3(torch.cat([F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3], dim=1))
        outs = [h(f).flatten(2) for h, f in zip(self.heads, (n3, n4, p5))]
        return torch.cat(outs, dim=2)  # [batch, 4 + classes, anchors]


# --- recurrent -------------------------------------------------------------------------------------------
class GRUClassifier(nn.Module):
    def __init__(self, features=64, hidden=256, layers=2, classes=32):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.gru = nn.GRU(hidden, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.gru(torch.relu(self.inp(x)))
        return self.head(out[:, -1])


class LSTMTagger(nn.Module):
    """Per-frame classes from 80-band features (a keyword spotter's or CTC recognizer's shape)."""

    def __init__(self, features=80, hidden=256, layers=2, classes=32):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(torch.relu(self.inp(x)))
        return self.head(out)


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    input_name: str
    shape: tuple
    sample: Callable[[np.random.Generator, tuple], np.ndarray]
    dtype: str = "float32"
    legacy_export: bool = False  # torch's legacy exporter: the recurrent entries' published figures were taken so


def _images(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _tokens(rng, shape):
    return rng.integers(0, 8000, shape).astype(np.int64)


ZOO = {
    "resnet18": ZooModel("resnet18", ResNet18, "image", (1, 3, 224, 224), _images),
    "mobilenetv2": ZooModel("mobilenetv2", MobileNetV2, "image", (1, 3, 224, 224), _images),
    "efficientnet": ZooModel("efficientnet", EfficientNetB0, "image", (1, 3, 224, 224), _images),
    "vit_tiny": ZooModel("vit_tiny", ViTTiny, "image", (1, 3, 224, 224), _images),
    "bert_small": ZooModel("bert_small", BertSmall, "ids", (1, 128), _tokens, dtype="int64"),
    "yolo_style": ZooModel("yolo_style", YoloStyle, "image", (1, 3, 320, 320), _images),
    "gru": ZooModel("gru", GRUClassifier, "x", (1, 64, 64), _images, legacy_export=True),
    "lstm": ZooModel("lstm", LSTMTagger, "x", (1, 100, 80), _images, legacy_export=True),
}


def build_module(entry: ZooModel, seed: int = 0) -> nn.Module:
    """Random weights; BatchNorm running statistics set on synthetic inputs so ranges look trained."""
    torch.manual_seed(seed)
    module = entry.build()
    rng = np.random.default_rng(seed)
    if any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        module.train()
        with torch.no_grad():
            for _ in range(4):
                module(torch.from_numpy(entry.sample(rng, (8, *entry.shape[1:]))))
    return module.eval()
