"""A value a Loop carries unchanged from a constant start is that constant in every iteration: the body reads
the constant.

TensorFlow's while loops pass what their body reads as loop variables, and tf2onnx keeps them so: a Keras GRU
converted from a SavedModel carries its kernels through a ``Loop`` whose body returns them as it got them, so
its cell's MatMuls read two activations (as far as any pass can see) and were left float.

Rules:
- A carried value (Loop input 2 + k, body input 2 + k) whose body output 1 + k is that body input, directly or
  through Identity nodes, and whose Loop input is a constant (an initializer, or a Constant node's output), is
  read by the body's nodes — nested subgraphs included — as that constant, an outer-scope value.
- Where nothing reads the Loop's final value of it (its output k), the carried value is dropped from the Loop
  (input, body input, body output, output): carried on, the float weight would stay in the model beside the
  int8 copy its readers get. Otherwise it stays, unused inside.
- Loops inside subgraphs are rewritten as well; nothing else changes.

Results: :attr:`hoisted` (carried values now read as constants).
"""

from __future__ import annotations

import onnx_ir as ir


class LoopConstantsPass(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.hoisted = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type != "Loop" or node.domain not in ("", "ai.onnx") or "body" not in node.attributes:
                continue
            body = node.attributes["body"].as_graph()
            dropped = []
            for k, initial in enumerate(node.inputs[2:]):
                if initial is None or ir.convenience.get_const_tensor(initial) is None \
                        or 2 + k >= len(body.inputs) or 1 + k >= len(body.outputs):
                    continue
                carried = body.inputs[2 + k]
                uses = list(carried.uses())
                if _passed_through(body.outputs[1 + k]) is carried and uses:
                    for user, index in uses:  # the body's output stays the carried value
                        user.replace_input_with(index, initial)
                    self.hoisted += 1
                    if not list(node.outputs[k].uses()) and not node.outputs[k].is_graph_output():
                        dropped.append(k)
            if dropped:
                _drop_carried(node, body, dropped)
        return ir.passes.PassResult(model, modified=bool(self.hoisted))


def _drop_carried(node: ir.Node, body: ir.Graph, dropped: list[int]) -> None:
    """Rebuild ``node`` without the carried values ``dropped`` (their outputs unused)."""
    for k in sorted(dropped, reverse=True):
        body.outputs.pop(1 + k)
        body.inputs.pop(2 + k)
    inputs = [v for i, v in enumerate(node.inputs) if i - 2 not in dropped]
    kept = [v for k, v in enumerate(node.outputs) if k not in dropped]
    loop = ir.Node(node.domain, "Loop", inputs, attributes=list(node.attributes.values()), num_outputs=len(kept),
                   name=node.name, version=node.version)
    node.graph.insert_before(node, loop)
    for old, new in zip(kept, loop.outputs):
        name, old.name = old.name, None
        new.name, new.type, new.shape = name, old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)


def _passed_through(value: ir.Value) -> ir.Value:
    """The value an Identity chain ending in ``value`` starts from."""
    while value.producer() is not None and value.producer().op_type == "Identity":
        value = value.producer().inputs[0]
    return value
