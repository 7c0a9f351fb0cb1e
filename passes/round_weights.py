"""Choose the rounding of int8 weights by layer-wise reconstruction (GPTQ) instead of rounding to nearest.

Rules:
- A layer is rewritten when the quantized model reads its weight through a DequantizeLinear of constant
  8-bit integers with one scale per output channel or per tensor (what :mod:`edgeq.passes.insert_qdq` makes),
  and its float view (``layers``: an ungrouped Conv, a Gemm or a MatMul with an unshared weight) has an input
  Gram matrix H from :mod:`edgeq.passes.layer_inputs`. Layers left float, 4-bit or fp16 in this build are not
  touched.
- The grid stays: scales and zero points are those already stored, integers stay within the range the
  stored ones span (±127, or ±63 with reduce_range). Only which grid point each weight takes changes: columns
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
from edgeq.quant.obs import compensate, output_error

_INT8 = (ir.DataType.INT8, ir.DataType.UINT8)


class RoundWeightsPass(ir.passes.InPlacePass):
    def __init__(self, layers: dict[str, Layer], grams: dict[str, np.ndarray]):
        super().__init__()
        self.float_layers, self.grams = layers, grams
        self.layers: dict[str, dict] = {}  # every layer solved so far: its output errors, and whether it changed
        self._solutions: dict[str, np.ndarray | None] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node, layer, weight in quantized_layers(model, self.float_layers):
            if node.name not in self.grams or weight.block or weight.integers.const_value.dtype not in _INT8:
                continue
            if weight.axis not in (None, layer.out_axis) or len(list(weight.integers.uses())) > 1:
                continue
            integers = self._solve(layer, weight)
            if integers is not None:
                weight.integers.const_value = ir.tensor(integers.astype(weight.integers.const_value.numpy().dtype),
                                                        name=weight.integers.name)
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
            nearest = layer.rows(weight.integers.const_value.numpy()).astype(np.float64)
            scale = np.broadcast_to(np.asarray(weight.scale, dtype=np.float64).reshape(-1), (rows.shape[0],))
            zero = np.broadcast_to(np.asarray(weight.zero, dtype=np.float64).reshape(-1), (rows.shape[0],))
            qmax = float(np.abs(nearest - zero[:, None]).max())

            def settle(column: int, block: np.ndarray, inverse: np.ndarray, i: int) -> np.ndarray:
                q = np.clip(np.round(block[:, i] / scale) + zero, zero - qmax, zero + qmax)
                return (q - zero) * scale

            solved = compensate(rows, gram, settle)
            integers = np.round(solved / scale[:, None]) + zero[:, None]
            before = output_error(rows, (nearest - zero[:, None]) * scale[:, None], gram)
            after = output_error(rows, solved, gram)
            better = after < before
            self.layers[name] = {"nearest_error": before, "error": after, "changed": bool(better)}
            self._solutions[name] = layer.from_rows(integers) if better else None
        return self._solutions[name]
