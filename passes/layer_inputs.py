"""Collect each layer's input statistics on calibration data: the mean row E[x], each feature's range and the
Gram matrix H = Σ xᵀx.

Rules:
- x is one row of the layer's input as its weight sees it: for Conv an input patch (im2col) with features
  ordered (kernel position…, input channel), matching :meth:`edgeq.passes.sparsify.Layer.rows`; for
  MatMul/Gemm one row of the input's last axis.
- The model runs in ONNX Runtime with the layers' inputs added as outputs, one feed at a time. From each feed
  at most ``rows_per_feed`` rows are used, chosen by a seeded generator, so the cost does not grow with the
  image size; H accumulates in float32 (F² · 4 bytes per distinct input, F the feature count).
  A grouped Conv's rows are patches of its whole input (every group's channels).
- Layers that read the same tensor with the same geometry share one H and one mean. With ``grams=False``, or
  for a grouped Conv, only the mean is kept.

Side-effect only: the model is not changed; the results are :attr:`LayerInputsPass.grams` (layer name → H),
:attr:`LayerInputsPass.means` (layer name → E[x]), :attr:`LayerInputsPass.ranges` (layer name → (min, max)
per feature, over the rows used) and :attr:`LayerInputsPass.rows` (layer name → how many rows
they sum).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from edgeq.calibration_data import CalibrationData
from edgeq.model_io import to_proto
from edgeq.passes.sparsify import Layer

ROWS_PER_FEED = 256
FLUSH_ROWS = 4096


def conv_geometry(layer: Layer, spatial_rank: int) -> tuple:
    node, kernel = layer.node, layer.array.shape[2:]
    ones = (1,) * spatial_rank
    strides = tuple(node.attributes.get_ints("strides", ones))
    dilations = tuple(node.attributes.get_ints("dilations", ones))
    pads = tuple(node.attributes.get_ints("pads", (0,) * 2 * spatial_rank))
    return kernel, strides, dilations, pads, node.attributes.get_string("auto_pad", "NOTSET")


def _same_pads(size: tuple, kernel, strides, dilations, upper: bool) -> tuple:
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return (*begins, *ends)


def conv_patches(x: np.ndarray, geometry: tuple, pick: Callable[[int], np.ndarray]) -> np.ndarray:
    """Rows [n, k… · C] of input patches of ``x`` [B, C, spatial…]; ``pick(count)`` chooses which of the
    ``count`` output positions to use."""
    kernel, strides, dilations, pads, auto_pad = geometry
    rank = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x.shape[2:], kernel, strides, dilations, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        pads = (0,) * 2 * rank
    x = np.pad(x, [(0, 0), (0, 0), *zip(pads[:rank], pads[rank:])])
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    windows = sliding_window_view(x, extent, axis=tuple(range(2, 2 + rank)))  # [B, C, out…, extent…]
    windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in strides),
                       *(slice(None, None, d) for d in dilations))]
    batch, outs = windows.shape[0], windows.shape[2:2 + rank]
    chosen = pick(batch * int(np.prod(outs)))
    position = np.unravel_index(chosen, (batch, *outs))
    patches = windows[(position[0], slice(None), *position[1:])]  # [n, C, k…]
    return np.moveaxis(patches, 1, -1).reshape(len(chosen), -1)


class _GramSum:
    """Σ xᵀx (when ``gram``) and Σ x over rows that arrive a few at a time. Rows are buffered and multiplied in
    blocks of at least ``FLUSH_ROWS``: one product per small feed would write the whole F × F matrix each time
    (memory-bound)."""

    def __init__(self, gram: bool = True):
        self.gram = gram
        self.sum: np.ndarray | None = None
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.pending: list[np.ndarray] = []
        self.rows = 0
        self.count = 0  # rows summed so far, flushed or not

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.rows += len(rows)
        self.count += len(rows)
        if self.rows >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        block = np.concatenate(self.pending)
        column_sum, low, high = block.sum(axis=0, dtype=np.float64), block.min(axis=0), block.max(axis=0)
        first = self.sum is None
        self.sum = column_sum if first else self.sum + column_sum
        self.low = low if first else np.minimum(self.low, low)
        self.high = high if first else np.maximum(self.high, high)
        if self.gram:
            with np.errstate(invalid="ignore", over="ignore"):  # ±inf inputs: H is not finite, and users check
                gram = block.T @ block
            self.total = gram if self.total is None else self.total + gram
        self.pending, self.rows = [], 0

    def result(self) -> tuple[np.ndarray | None, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(H or None, E[x], (min, max) per feature)."""
        if self.pending:
            self._flush()
        return self.total, (self.sum / max(self.count, 1)).astype(np.float32), (self.low, self.high)


class LayerInputsPass(ir.passes.PassBase):
    in_place = True
    changes_input = False

    def __init__(self, data: CalibrationData, layers: list[Layer], rows_per_feed: int = ROWS_PER_FEED,
                 seed: int = 0, on_progress: Callable[[int, int], None] | None = None, grams: bool = True):
        super().__init__()
        self.data, self.layers, self.want_grams = data, layers, grams
        self.rows_per_feed, self.seed = rows_per_feed, seed
        self.on_progress = on_progress
        self.grams: dict[str, np.ndarray] = {}
        self.means: dict[str, np.ndarray] = {}
        self.ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.rows: dict[str, int] = {}

    def _key(self, layer: Layer) -> tuple:
        source = layer.node.inputs[0].name
        if layer.node.op_type != "Conv":
            return (source,)
        return (source, conv_geometry(layer, layer.array.ndim - 2))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from edgeq.runtimes.onnxruntime import run_exposing

        keys = {layer.node.name: self._key(layer) for layer in self.layers}
        distinct = list(dict.fromkeys(keys.values()))
        names = list(dict.fromkeys(key[0] for key in distinct))
        gram_keys = {keys[layer.node.name] for layer in self.layers if self.want_grams and layer.groups == 1}
        sums = {key: _GramSum(key in gram_keys) for key in distinct}
        rng = np.random.default_rng(self.seed)

        def pick(count: int) -> np.ndarray:
            if count <= self.rows_per_feed:
                return np.arange(count)
            return np.sort(rng.choice(count, self.rows_per_feed, replace=False))

        feeds = (feed.inputs for feed in self.data)
        for i, outputs in enumerate(run_exposing(to_proto(model), names, feeds)):
            values = dict(zip(names, outputs))
            for key in distinct:
                x = values[key[0]].astype(np.float32)
                if len(key) > 1:
                    sums[key].add(conv_patches(x, key[1], pick))
                else:
                    flat = x.reshape(-1, x.shape[-1])
                    sums[key].add(flat[pick(len(flat))])
            if self.on_progress:
                self.on_progress(i + 1, len(self.data))
        results = {key: total.result() for key, total in sums.items()}
        self.grams = {name: results[key][0] for name, key in keys.items() if results[key][0] is not None}
        self.means = {name: results[key][1] for name, key in keys.items()}
        self.ranges = {name: results[key][2] for name, key in keys.items()}
        self.rows = {name: sums[key].count for name, key in keys.items()}
        return ir.passes.PassResult(model, modified=False)
