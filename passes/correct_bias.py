"""Correct the bias of quantized layers for the mean error their rounded weights make (empirical bias correction).

A layer computes y = Wx + b; with its weight rounded it computes Ŵx + b, off by (W − Ŵ)x. On the calibration
data that error has mean e = (W − Ŵ)·E[x] per output channel, and adding e to the bias removes it (DFQ,
Nagel et al. 2019; AIMET's empirical bias correction). E[x] is measured (:mod:`edgeq.passes.layer_inputs`),
not inferred from BatchNorm, so it holds for any model.

Rules:
- A layer is corrected when the quantized model reads its weight through a DequantizeLinear of constants
  (int8 per channel or per tensor, 4-bit blocks) and ``means`` has its input's mean; Ŵ is what that
  DequantizeLinear returns. Layers left float in this build are not touched.
- Where the correction goes: a Conv/Gemm bias input — int32 integers (``round(e / bias scale)`` added to the
  stored ones) or a float constant; a MatMul's bias is the constant [N] input of the one Add its output feeds
  (a torch Linear exported as MatMul + Add; through the Q→DQ pair of a quantized output), when that constant
  feeds nothing else. A layer with no bias keeps
  none (not yet: a new int32 bias input for it is future work); it is reported.
- A layer whose input mean is not finite (±inf activations) is not corrected.
- A grouped or depthwise Conv's output channel uses its own group's channels of E[x].
- Corrections are cached per layer name, so one pass object serves every candidate build of a compile; the
  relative size ‖e‖ / ‖b‖ is reported per layer (:attr:`CorrectBiasPass.layers`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes.insert_qdq import constant_dequantize, quantized_layers
from edgeq.passes.sparsify import Layer


def _group_means(layer: Layer, mean: np.ndarray) -> np.ndarray:
    """E[x] as each output channel's features see it: [outputs, features] (one row per output channel)."""
    groups = layer.groups
    if groups == 1:
        return np.broadcast_to(mean, (layer.out_channels, mean.size))
    per_group = layer.in_channels  # a grouped Conv weight stores each group's input channels
    by_group = mean.reshape(-1, groups, per_group)  # [kernel positions, groups, channels]
    rows = np.moveaxis(by_group, 1, 0).reshape(groups, -1)
    return np.repeat(rows, layer.out_channels // groups, axis=0)


def _sole_use(value: ir.Value, op_type: str) -> tuple[ir.Node, int] | None:
    uses = list(value.uses())
    return uses[0] if len(uses) == 1 and uses[0][0].op_type == op_type else None


def _bias_of(node: ir.Node) -> ir.Value | None:
    """The value that holds the node's bias: its bias input, or a MatMul's constant Add operand (reached
    through the output's Q→DQ pair when the output is quantized)."""
    if node.op_type in ("Conv", "Gemm"):
        return node.inputs[2] if len(node.inputs) > 2 else None
    if node.op_type != "MatMul":
        return None
    value = node.outputs[0]
    quantize = _sole_use(value, "QuantizeLinear")
    dequantize = _sole_use(quantize[0].outputs[0], "DequantizeLinear") if quantize else None
    if dequantize is not None:
        value = dequantize[0].outputs[0]
    add = _sole_use(value, "Add")
    if add is None:
        return None
    other = add[0].inputs[1 - add[1]]
    return other if other is not None and other.const_value is not None and len(other.const_value.shape) == 1 else None


class CorrectBiasPass(ir.passes.InPlacePass):
    def __init__(self, layers: dict[str, Layer], means: dict[str, np.ndarray]):
        super().__init__()
        self.float_layers, self.means = layers, means
        self.layers: dict[str, dict] = {}
        self._corrections: dict[str, np.ndarray] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node, layer, weight in quantized_layers(model, self.float_layers):
            if node.name not in self.means or not np.isfinite(self.means[node.name]).all():
                continue
            bias = _bias_of(node)
            correction = self._correction(layer, weight.dequantized())
            if bias is None or len(list(bias.uses())) > 1:
                self.layers[node.name] |= {"applied": False, "reason": "no bias of its own"}
                continue
            modified |= self._apply(bias, correction, node.name)
        return ir.passes.PassResult(model, modified=modified)

    def _correction(self, layer: Layer, rounded: np.ndarray) -> np.ndarray:
        name = layer.node.name
        if name not in self._corrections:
            delta = layer.rows(layer.array.astype(np.float64) - rounded)
            self._corrections[name] = np.sum(delta * _group_means(layer, self.means[name]), axis=1)
            self.layers[name] = {"correction_norm": float(np.linalg.norm(self._corrections[name]))}
        return self._corrections[name]

    def _apply(self, bias: ir.Value, correction: np.ndarray, name: str) -> bool:
        quantized = constant_dequantize(bias)
        target = quantized.integers if quantized is not None else bias
        if len(list(target.uses())) > 1:
            self.layers[name] |= {"applied": False, "reason": "bias shared with another node"}
            return False
        stored = target.const_value.numpy()
        if stored.size != correction.size:
            self.layers[name] |= {"applied": False, "reason": f"bias of shape {list(stored.shape)}"}
            return False
        correction = correction.reshape(stored.shape)
        if quantized is not None:
            value = quantized.dequantized()
            step = np.broadcast_to(np.asarray(quantized.scale, dtype=np.float64), stored.shape)
            updated = np.clip(stored.astype(np.int64) + np.round(correction / step), -(2**31), 2**31 - 1)
        else:
            value = stored.astype(np.float64)
            updated = stored + correction
        target.const_value = ir.tensor(updated.astype(stored.dtype), name=target.name)
        norm = float(np.linalg.norm(value))
        self.layers[name] |= {"applied": True, "relative": float(np.linalg.norm(correction)) / norm if norm else None}
        return True
