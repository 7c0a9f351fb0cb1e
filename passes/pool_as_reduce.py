"""Rewrite a MaxPool that runs in int8 over non-overlapping windows as Reshape + ReduceMax.

ONNX Runtime's integer MaxPool (what DequantizeLinear → MaxPool → QuantizeLinear becomes) is a scalar loop where
its channels-last int8 chain (QLinearConv → MaxPool) does not reach it; its integer ReduceMax is not. Measured in
QDQ form on one Sapphire Rapids thread: a 1×4 pool over [1, 64, 314, 64] 5.0 → 0.80 ms, a 2×2 pool over
[1, 32, 100, 64] 0.80 → 0.36 ms (audio models pool frequency bins this way); inside a chain the MaxPool wins (a
keyword model's small 2×2 pools: 0.02 → 0.13 ms). So the pipeline measures it as an optional op set member
(``MaxPoolAsReduce``, :mod:`edgeq.search.op_sets`).

Rules:
- A MaxPool qualifies when it runs in int8 — it reads a DequantizeLinear's output and only QuantizeLinear nodes
  read its output — has no indices output, and its windows tile the input: ``kernel_shape`` = ``strides``, no
  padding, dilations 1, no ``ceil_mode``, and each pooled dimension (window > 1) is static and a multiple of
  its window. The model's opset has integer ReduceMax (12+).
- The input [N, C, d₁, …] is reshaped with a window axis after each pooled dimension, [N, C, …, dᵢ/kᵢ, kᵢ, …]
  (a kept dimension is copied while no axis was inserted before it, else given its static size, else −1
  once), and ReduceMax over the window axes (keepdims 0) gives the MaxPool's output: the maximum of the same
  integers, exactly.
- The ReduceMax takes the MaxPool's name (per-node profiles attribute its time to that node), the Reshape
  the name with ``_windows``.

Results: :attr:`rewritten` (the MaxPool names).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes.convert_opset import default_opset

INTEGER_REDUCE_MAX = 12  # the opset from which ReduceMax takes int8/uint8
AXES_AS_INPUT = 18  # the opset from which ReduceMax reads its axes from an input


def windows_tile(node: ir.Node) -> bool:
    """Whether a MaxPool's windows tile its input (rule 1's attributes: kernel = strides, no padding, dilations 1,
    no ceil_mode, one output)."""
    if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return False
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    kernel = list(attrs.get("kernel_shape", []))
    return bool(kernel) and list(attrs.get("strides", kernel)) == kernel and not any(attrs.get("pads", [0])) \
        and all(d == 1 for d in attrs.get("dilations", [1])) and not attrs.get("ceil_mode", 0) \
        and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


class PoolAsReducePass(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.rewritten: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = default_opset(model)
        if opset >= INTEGER_REDUCE_MAX:
            for node in list(model.graph):
                shape = self._windowed_shape(node)
                if shape is not None:
                    self._rewrite(model.graph, node, shape, opset)
        return ir.passes.PassResult(model, modified=bool(self.rewritten))

    @staticmethod
    def _windowed_shape(node: ir.Node) -> tuple[list[int], list[int]] | None:
        """The Reshape target and the window axes of a qualifying MaxPool, else None."""
        if not windows_tile(node):
            return None
        data, out = node.inputs[0], node.outputs[0]
        producer = data.producer() if data is not None else None
        kernel = list(node.attributes["kernel_shape"].value)
        if (producer is None or producer.op_type != "DequantizeLinear" or out.is_graph_output()
                or not list(out.uses()) or any(user.op_type != "QuantizeLinear" for user, _ in out.uses())
                or data.shape is None or len(data.shape) != len(kernel) + 2):
            return None
        target, axes, unknown = [0, 0], [], False
        for index, (dim, window) in enumerate(zip(list(data.shape)[2:], kernel), start=2):
            if window > 1:
                if not isinstance(dim, int) or dim % window:
                    return None
                target += [dim // window, window]
                axes.append(len(target) - 1)
            elif len(target) == index:
                target.append(0)
            elif isinstance(dim, int):
                target.append(dim)
            elif not unknown:
                target.append(-1)
                unknown = True
            else:
                return None
        return (target, axes) if axes else None

    def _rewrite(self, graph: ir.Graph, node: ir.Node, shape: tuple[list[int], list[int]], opset: int) -> None:
        target, axes = shape
        name = node.name or node.outputs[0].name
        target_value = ir.Value(name=f"{name}_windows_shape", const_value=ir.tensor(np.array(target, np.int64)))
        graph.register_initializer(target_value)
        reshape = ir.Node("", "Reshape", [node.inputs[0], target_value], num_outputs=1, name=f"{name}_windows")
        reshape.outputs[0].name, reshape.outputs[0].dtype = f"{name}_windows", node.inputs[0].dtype
        if opset >= AXES_AS_INPUT:
            axes_value = ir.Value(name=f"{name}_window_axes", const_value=ir.tensor(np.array(axes, np.int64)))
            graph.register_initializer(axes_value)
            reduce = ir.Node("", "ReduceMax", [reshape.outputs[0], axes_value], [ir.AttrInt64("keepdims", 0)],
                             num_outputs=1, name=name)
        else:
            reduce = ir.Node("", "ReduceMax", [reshape.outputs[0]],
                             [ir.AttrInt64s("axes", axes), ir.AttrInt64("keepdims", 0)], num_outputs=1, name=name)
        graph.insert_before(node, [reshape, reduce])
        out, pooled = node.outputs[0], reduce.outputs[0]
        pooled.dtype, pooled.shape = out.dtype, out.shape
        for user, index in list(out.uses()):
            user.replace_input_with(index, pooled)
        graph.remove(node, safe=True)
        pooled.name = out.name
        self.rewritten.append(name)
