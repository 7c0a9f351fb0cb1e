"""Transposes that wrap convolutions in a channels-last graph cancel, by ONNX Runtime's transpose optimizer.

A model ported from a channels-last framework (TensorFlow, Caffe through a converter, torch code that permutes
an NHWC input) wraps every Conv in ``Transpose(0, 3, 1, 2)`` … ``Transpose(0, 2, 3, 1)`` and runs its
BatchNorm, bias and activations between them. ONNX Runtime's float session removes those Transposes when it
loads the model; a quantized model keeps them (its Q/DQ pairs stand between them), and the arithmetic they
hold apart from each Conv stays float: Yahoo's open_nsfw (a torch port of the Caffe ResNet, NHWC input, 106
Transposes) was int8 ×0.72, and ×0.44 once they cancel and its BatchNorms fold (:mod:`edgeq.passes.
fold_conv_affine`).

Rules:
- Only where the main graph has a Transpose next to a Conv (its input or its only reader): a transformer's
  Transposes (heads, a tied table's weight) are left as the exporter wrote them.
- ONNX Runtime's ``TransposeOptimizer`` alone runs (every other basic-level optimizer disabled; the caller
  gives it, :func:`edgeq.runtimes.onnxruntime.transposes_optimized`): it pushes Transposes through
  elementwise and shape ops, permuting constants, until pairs meet and cancel. Written by hand this would be
  a second copy of that optimizer.
- The result is kept only if it has fewer Transposes, every other op type as often as before but the shape
  ops the optimizer may add or remove (Squeeze, Unsqueeze, Reshape), no more constant bytes than
  :data:`GROWTH` over the original, and the same inputs and outputs; else the model is left as it was.
  A model that does not load, or that is over ONNX's 2 GB protobuf limit, is left as it was.

Results: :attr:`cancelled` (Transposes fewer).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import onnx
import onnx_ir as ir

from edgeq.model_io import all_nodes

_SHAPE_OPS = frozenset({"Transpose", "Squeeze", "Unsqueeze", "Reshape"})
GROWTH = 1.01  # constant bytes the result may hold over the original (permuted copies of shared constants)
_PROTOBUF_LIMIT = 2 ** 31 - 1
TransposeOptimizer = Callable[[onnx.ModelProto], "onnx.ModelProto | None"]


class CancelTransposesPass(ir.passes.InPlacePass):
    """Cancel channels-last Transposes around Convs (module rules)."""

    def __init__(self, optimizer: TransposeOptimizer):
        """``optimizer``: the model with ONNX Runtime's transpose optimizer applied, or None where it cannot
        load (:func:`edgeq.runtimes.onnxruntime.transposes_optimized`: a pass runs no session itself)."""
        super().__init__()
        self.optimizer, self.cancelled = optimizer, 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not _wraps_convolutions(model.graph):
            return ir.passes.PassResult(model, modified=False)
        proto = ir.serde.serialize_model(model)
        if proto.ByteSize() > _PROTOBUF_LIMIT:
            return ir.passes.PassResult(model, modified=False)
        optimized = self.optimizer(proto)
        if optimized is None:
            return ir.passes.PassResult(model, modified=False)
        counts, new = _counts(proto), _counts(optimized)
        if not _acceptable(proto, optimized, counts, new):
            return ir.passes.PassResult(model, modified=False)
        self.cancelled = counts["Transpose"] - new["Transpose"]
        model.graph = ir.serde.deserialize_model(optimized).graph  # the model's metadata and functions stay
        return ir.passes.PassResult(model, modified=True)


def _wraps_convolutions(graph: ir.Graph) -> bool:
    for node in graph:
        if node.op_type != "Conv" or not node.inputs or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        readers = [user for user, _ in node.outputs[0].uses()]
        if producer is not None and producer.op_type == "Transpose" or \
                len(readers) == 1 and readers[0].op_type == "Transpose":
            return True
    return False


def _counts(proto: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in all_nodes(proto.graph))


def _constant_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


def _acceptable(before: onnx.ModelProto, after: onnx.ModelProto, counts: Counter, new: Counter) -> bool:
    """Module rule 3; ``counts`` and ``new``: op types before and after."""
    others = {op for op in counts.keys() | new.keys() if op not in _SHAPE_OPS}
    same_interface = [v.name for v in before.graph.input] == [v.name for v in after.graph.input] and \
        [v.name for v in before.graph.output] == [v.name for v in after.graph.output]
    return (new["Transpose"] < counts["Transpose"] and all(counts[op] == new[op] for op in others)
            and same_interface and _constant_bytes(after) <= GROWTH * _constant_bytes(before))
