"""Prune the constant weights of Conv, Gemm and MatMul layers to 2:4 along their input-channel axis.

Rules:
- Every main-graph Conv/ConvTranspose/Gemm/MatMul is judged and reported (``layers``): eligible when the
  target has 2:4 kernels for its op type, its weight is a constant float tensor used by this node alone, it is
  not grouped (Conv ``group`` 1), not excluded by the user, and its input / output channels meet the target's
  minimums and the input-channel multiple. A reason is recorded for every layer that is not pruned.
- A pruned weight keeps, in every group of four input channels (per output channel and kernel position), the
  two weights chosen by ``method``: ``magnitude``, or ``reconstruct`` — OBS on the layer's input Gram matrix
  from :mod:`edgeq.passes.layer_inputs`, which also updates the kept weights (:mod:`edgeq.sparse_solver`).
  Both relative output errors on the calibration data (magnitude-only and the chosen method) are reported
  per layer when the Gram matrices are given (magnitude pruning needs none).
- Layers in ``keep_dense`` (left dense by the accuracy budget) are eligible but not pruned.
- Pruned weights are annotated (:mod:`edgeq.sparse24`), and so is the model.
- Solutions are cached per layer name, so the same pass object can prune clones of one model with different
  ``keep_dense`` sets without solving again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeq.passes.exclude import EXCLUDE_KEY
from edgeq.sparse24 import KEY, PATTERN, annotate
from edgeq.quant.obs import output_errors
from edgeq.sparse_solver import prune_magnitude, prune_reconstruct
from edgeq.target import SparsityRules

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass(frozen=True)
class Layer:
    """A layer's constant weight seen as rows [outputs, features], features ordered (kernel position…, input
    channel) so that groups of four consecutive features are four input channels."""

    node: ir.Node
    weight: ir.Value
    in_axis: int  # the reduction axis of the stored weight
    out_axis: int
    transposed: bool  # stored as [in, out] (MatMul, Gemm with transB=0)

    @property
    def array(self) -> np.ndarray:
        return self.weight.const_value.numpy()

    @property
    def groups(self) -> int:
        return self.node.attributes.get_int("group", 1) if self.node.op_type == "Conv" else 1

    @property
    def in_channels(self) -> int:
        return int(self.weight.const_value.shape[self.in_axis])

    @property
    def out_channels(self) -> int:
        return int(self.weight.const_value.shape[self.out_axis])

    def rows(self, w: np.ndarray | None = None) -> np.ndarray:
        """The weight (or ``w``, an array of its shape) as rows [outputs, features]."""
        w = self.array if w is None else w
        if self.transposed:
            return w.T
        if w.ndim == 2:
            return w
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)  # Conv [O, I, k…] → [O, k… · I]

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        w = self.array
        if self.transposed:
            return np.ascontiguousarray(rows.T)
        if w.ndim == 2:
            return rows
        moved = (w.shape[0], *w.shape[2:], w.shape[1])
        return np.ascontiguousarray(np.moveaxis(rows.reshape(moved), -1, 1))


def layer_view(node: ir.Node, grouped: bool = False) -> Layer | str:
    """The node's weight as a :class:`Layer`, or why it cannot be pruned whatever the target (``grouped``:
    a grouped or depthwise Conv is a layer too; each output's features are then its group's channels)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return "weight is not constant (a product of two activations)"
    if weight.const_value.dtype not in _FLOATS:
        return f"weight dtype {weight.const_value.dtype} is not float"
    if len(list(weight.uses())) > 1:
        return "weight shared with another node"
    rank = len(weight.const_value.shape)
    if node.op_type == "ConvTranspose":
        return "ConvTranspose (its reduction axis is the output-channel axis)"
    if node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1 and not grouped:
            return "grouped or depthwise convolution"
        return Layer(node, weight, in_axis=1, out_axis=0, transposed=False)
    if rank != 2:
        return f"weight of rank {rank}"
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1"
        trans_b = bool(node.attributes.get_int("transB", 0))
        return Layer(node, weight, in_axis=1 if trans_b else 0, out_axis=0 if trans_b else 1, transposed=not trans_b)
    return Layer(node, weight, in_axis=0, out_axis=1, transposed=True)


def eligible_layer(node: ir.Node, rules: SparsityRules) -> Layer | str:
    """The node as a prunable :class:`Layer` under the target's rules, or why not."""
    if node.op_type not in rules.ops:
        return f"the target has no 2:4 kernel for {node.op_type}"
    if EXCLUDE_KEY in node.meta:
        return node.meta[EXCLUDE_KEY]
    layer = layer_view(node)
    if isinstance(layer, str):
        return layer
    cin, cout = layer.in_channels, layer.out_channels
    if cin < rules.min_in_channels:
        return f"{cin} input channels < {rules.min_in_channels}"
    if cin % rules.in_channel_multiple:
        return f"{cin} input channels not a multiple of {rules.in_channel_multiple}"
    if cout < rules.min_out_channels:
        return f"{cout} output channels < {rules.min_out_channels}"
    return layer


def eligible_layers(model: ir.Model, rules: SparsityRules) -> dict[str, Layer | str]:
    """Every main-graph layer by node name: a prunable :class:`Layer`, or why not."""
    return {node.name: eligible_layer(node, rules) for node in model.graph if node.op_type in LAYER_OPS}


def prunable(model: ir.Model, rules: SparsityRules) -> list[Layer]:
    return [layer for layer in eligible_layers(model, rules).values() if isinstance(layer, Layer)]


class Sparsify24Pass(ir.passes.InPlacePass):
    def __init__(self, rules: SparsityRules, grams: dict[str, np.ndarray], method: str = "reconstruct",
                 keep_dense: frozenset[str] | set[str] = frozenset()):
        super().__init__()
        self.rules, self.method, self.grams = rules, method, grams
        self.keep_dense = set(keep_dense)
        self.layers: dict[str, dict] = {}
        self.pruned = 0
        self._solutions: dict[str, tuple[np.ndarray, dict]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.layers = {}
        pruned = 0
        for node in model.graph:
            if node.op_type not in LAYER_OPS:
                continue
            name, layer = node.name, eligible_layer(node, self.rules)
            if isinstance(layer, str):
                self.layers[name] = {"op_type": node.op_type, "eligible": False, "pruned": False, "reason": layer}
                continue
            weights, figures = self._solve(layer)
            entry = {"op_type": layer.node.op_type, "eligible": True, "in_channels": layer.in_channels,
                     "out_channels": layer.out_channels, **figures,
                     "speedup_likely": min(layer.in_channels, layer.out_channels) >= self.rules.pays_from_channels}
            if name in self.keep_dense:
                self.layers[name] = entry | {"pruned": False, "reason": "kept dense: over the accuracy budget"}
                continue
            tensor = ir.tensor(weights, name=layer.weight.name)
            annotate(tensor, layer.in_axis)
            layer.weight.const_value = tensor
            self.layers[name] = entry | {"pruned": True, "reason": ""}
            pruned += 1
        self.pruned = pruned
        if pruned:
            model.metadata_props[KEY] = PATTERN
        return ir.passes.PassResult(model, modified=bool(pruned))

    def _solve(self, layer: Layer) -> tuple[np.ndarray, dict]:
        name = layer.node.name
        if name not in self._solutions:
            rows, gram = layer.rows().astype(np.float32), self.grams.get(name)
            if gram is None and self.method == "reconstruct":
                raise ValueError(f"no input Gram matrix for layer {name}: run LayerInputsPass first")
            magnitude = prune_magnitude(rows)
            chosen = prune_reconstruct(rows, gram) if self.method == "reconstruct" else magnitude
            figures = {} if gram is None else dict(zip(("magnitude_error", "error"),
                                                       output_errors(rows, gram, magnitude, chosen)))
            weights = layer.from_rows(chosen).astype(layer.array.dtype)
            self._solutions[name] = (weights, figures)
        return self._solutions[name]
