"""Train the example models on scikit-learn's bundled digits, export them, and write their feeds.

    python examples/build_examples.py          # rewrites examples/digits_cnn and examples/digits_transformer

Each folder gets ``model.onnx`` (float, dynamic batch), ``calib.npz`` (training images, stacked on the batch
axis: edgeq cuts them into batch-1 feeds) and ``eval.npz`` (held-out test images plus their ``label``).
Seeded: the same machine rebuilds the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import DigitsCNN, DigitsTransformer  # noqa: E402

from edgeq.export import export_module  # noqa: E402


def digits_split(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    return train_test_split(x, digits.target.astype(np.int64), test_size=0.2, random_state=seed,
                            stratify=digits.target)


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int = 0):
    torch.manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * ((len(x) + 63) // 64))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def build(name: str, model: torch.nn.Module, epochs: int, lr: float, calib_count: int = 256) -> None:
    x_train, x_test, y_train, y_test = digits_split()
    torch.set_num_threads(2)
    train(model, x_train, y_train, epochs, lr)
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    export_module(model, [("image", [1, 1, 8, 8], "float32")], folder / "model.onnx", dynamic_batch=True)
    np.savez_compressed(folder / "calib.npz", image=x_train[:calib_count])
    np.savez_compressed(folder / "eval.npz", image=x_test, label=y_test)
    print(f"{name}: test accuracy {accuracy(model, x_test, y_test):.4f} → {folder}")


if __name__ == "__main__":
    torch.manual_seed(0)
    build("digits_cnn", DigitsCNN(), epochs=15, lr=3e-3)
    torch.manual_seed(0)
    build("digits_transformer", DigitsTransformer(), epochs=30, lr=2e-3)
