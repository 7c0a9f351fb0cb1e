"""Shape inference that keeps a sequence a sequence.

onnx_ir 1.1's ``ShapeInferencePass`` copies each inferred value's element type and shape, not its type: a value
it had no type for and that holds a sequence became a tensor of the sequence's element type. torch's legacy
exporter writes ``repeat_interleave`` with a tensor of repeats (a FastSpeech-style length regulator) as
SplitToSequence → Loop(SequenceInsert) → ConcatFromSequence; the Loop's sequence output was typed a tensor and
ONNX Runtime refused the normalized model.

Rules, after onnx_ir's pass, node by node through every graph:
- the outputs of the ops that make sequences (SplitToSequence, SequenceEmpty, SequenceConstruct,
  SequenceInsert, SequenceErase) typed as a tensor become a sequence of that tensor type;
- a Loop's loop-carried outputs and an If's outputs take their subgraph's output type where that is a
  sequence.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

SEQUENCE_OPS = frozenset({"SplitToSequence", "SequenceEmpty", "SequenceConstruct", "SequenceInsert",
                          "SequenceErase"})


class InferShapesPass(ir.passes.InPlacePass):
    """onnx_ir's shape inference, sequences kept (module rules)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        common.ShapeInferencePass()(model)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for value, made in zip(node.outputs, _made_types(node)):
                if isinstance(value.type, ir.TensorType) and isinstance(made, ir.SequenceType):
                    value.type = made
        return ir.passes.PassResult(model, modified=True)


def _made_types(node: ir.Node) -> list:
    """The type each output of ``node`` holds where it is a sequence by the node's nature, else None."""
    if node.domain not in ("", "ai.onnx"):
        return [None] * len(node.outputs)
    if node.op_type in SEQUENCE_OPS:
        return [ir.SequenceType(value.type) if isinstance(value.type, ir.TensorType) else value.type
                for value in node.outputs]
    if node.op_type == "Loop" and "body" in node.attributes:
        carried = node.attributes["body"].as_graph().outputs[1:]  # the condition first, then carried values
        return [value.type for value in carried] + [None] * (len(node.outputs) - len(carried))
    if node.op_type == "If" and "then_branch" in node.attributes:
        return [value.type for value in node.attributes["then_branch"].as_graph().outputs]
    return [None] * len(node.outputs)
