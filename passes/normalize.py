"""Normalize a float model into the form the later passes expect.

Rules, in order:
1. A model that already holds quantization ops (QuantizeLinear, QLinear*, *Integer, …) is refused: quantizing
   twice only loses accuracy. The user must pass the float original.
2. The default-domain opset is raised to at least 13 (per-channel DequantizeLinear needs ``axis``).
3. ``Constant`` nodes holding tensors become initializers, so weights stored that way (legacy exporters,
   converters) get per-channel scales like any other weight — in subgraphs too.
4. onnxscript's optimizer folds constants, fuses BatchNorm into Conv/Gemm, removes no-op and Identity nodes
   and dead code; onnx_ir's shape inference then types every intermediate value.

Deterministic: the same input model gives the same output model.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from onnxscript.version_converter import ConvertVersionPass

from edgeq.errors import UserError

MIN_OPSET = 13
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "DynamicQuantizeMatMul",
    "MatMulNBits", "MatMulIntegerToFloat", "QLinearConcat", "QLinearSigmoid", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeLSTM",
})


def quantized_ops_in(model: ir.Model) -> list[str]:
    """The quantization op types present anywhere in the model (subgraphs included)."""
    return sorted({node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
                   if node.op_type in QUANTIZED_OPS})


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


class NormalizePass(ir.passes.InPlacePass):
    """Upgrade opset, lift Constant weights, fold, fuse BatchNorm, drop Identity, infer shapes."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = quantized_ops_in(model)
        if found:
            raise UserError(f"the model is already quantized (it contains {', '.join(found[:4])})",
                            "pass the float model that it was made from")
        if default_opset(model) < MIN_OPSET:
            ConvertVersionPass(MIN_OPSET, fallback=True)(model)
            if default_opset(model) < MIN_OPSET:
                raise UserError(f"cannot upgrade the model from opset {default_opset(model)} to {MIN_OPSET}",
                                "re-export it with opset 13 or later")
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
        onnxscript.optimizer.optimize_ir(model)
        ir.passes.PassManager([
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.ShapeInferencePass(),
            common.TopologicalSortPass(),
        ])(model)
        return ir.passes.PassResult(model, modified=True)
