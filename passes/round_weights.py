"""Choose the rounding of int8 and int4 weights by layer-wise reconstruction (GPTQ) instead of rounding to nearest.

Rules:
- A layer is rewritten when the quantized model reads its weight through a DequantizeLinear of constant
  integers (what :mod:`edgeq.passes.insert_qdq` makes: 8-bit with one scale per output channel or per tensor,
  or 4-bit in blocks along the reduction axis), and its float view (``layers``: an ungrouped Conv, a Gemm or a
  MatMul with an unshared weight) has an input Gram matrix H from :mod:`edgeq.passes.layer_inputs`. Layers
  left float or fp16 in this build are not touched.
- The grid stays: scales and zero points are those already stored, integers stay within the range the
  stored ones span (±127, or ±63 with reduce_range; 0…15 for 4-bit). Only which grid point each weight takes
  changes: columns
  are settled to the nearest grid point of their compensated values and each column's rounding error is spread
  over the columns not yet settled (:mod:`edgeq.quant.obs`), so the layer's outputs on the calibration data
  stay closest to float.
- A layer's new integers are kept only when their output error ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration data is
  below rounding to nearest's; both figures are reported per layer (:attr:`RoundWeightsPass.layers`).
- A layer whose inputs were not finite on the calibration data keeps nearest rounding.
- Solutions are cached per layer name, so one pass object serves every candidate build of a compile.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes.insert_qdq import ConstantDequantize, quantized_layers
from edgeq.passes.sparsify import Layer
from edgeq.quant.obs import compensate, output_errors

_INTEGERS = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.UINT4)


class RoundWeightsPass(ir.passes.InPlacePass):
    def __init__(self, layers: dict[str, Layer], grams: dict[str, np.ndarray]):
        super().__init__()
        self.float_layers, self.grams = layers, grams
        self.layers: dict[str, dict] = {}  # every layer solved so far: its output errors, and whether it changed
        self._solutions: dict[str, np.ndarray | None] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node, layer, weight in quantized_layers(model, self.float_layers):
            if node.name not in self.grams or weight.integers.const_value.dtype not in _INTEGERS:
                continue
            axis = layer.in_axis if weight.block else layer.out_axis  # blocks run along the reduction axis
            if weight.axis not in (None, axis) or len(list(weight.integers.uses())) > 1:
                continue
            integers = self._solve(layer, weight)
            if integers is not None:
                stored = weight.integers.const_value
                weight.integers.const_value = ir.Tensor(integers.astype(np.int8 if stored.dtype == ir.DataType.INT8
                                                                        else np.uint8),
                                                        dtype=stored.dtype, name=weight.integers.name)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _solve(self, layer: Layer, weight: ConstantDequantize) -> np.ndarray | None:
        """The layer's reconstructed integers (weight-shaped), or None when nearest rounding is as good."""
        name = layer.node.name
        if name not in self._solutions and not np.isfinite(self.grams[name]).all():
            self.layers[name] = {"changed": False, "reason": "non-finite layer inputs"}
            self._solutions[name] = None
        if name not in self._solutions:
            gram, rows = self.grams[name], layer.rows().astype(np.float64)
            nearest = layer.rows(weight.integers.const_value.numpy().astype(np.float64))
            scale, zero = (layer.rows(grid) for grid in weight.grid())
            if weight.integers.const_value.dtype == ir.DataType.UINT4:
                low, high = np.zeros_like(zero), np.full_like(zero, 15.0)
            else:
                span = float(np.abs(nearest - zero).max())
                low, high = zero - span, zero + span

            def settle(column: int, block: np.ndarray, inverse: np.ndarray, i: int) -> np.ndarray:
                s, z = scale[:, column], zero[:, column]
                q = np.clip(np.round(block[:, i] / s) + z, low[:, column], high[:, column])
                return (q - z) * s

            solved = compensate(rows, gram, settle)
            integers = np.round(solved / scale) + zero
            before, after = output_errors(rows, gram, (nearest - zero) * scale, solved)
            better = after < before
            self.layers[name] = {"nearest_error": before, "error": after, "changed": bool(better)}
            self._solutions[name] = layer.from_rows(integers) if better else None
        return self._solutions[name]
