"""Reorder the channels between two layers so that 2:4 pruning of the second keeps more weight magnitude,
without changing what the model computes.

Rules:
- A consumer (a layer the target can prune) is permuted when its data input comes from a producer layer
  (Conv with group 1, Gemm or MatMul, constant weight used by it alone) through a region of nodes that treat
  each channel on its own: unary elementwise ops, pooling (after a Conv), and binary elementwise ops whose
  other input is a constant scalar or per-channel vector, or another value of the region. No value of the
  region is a graph output or is read outside it; the region ends at the consumer's data input only.
- The channel order comes from :func:`edgeq.sparse_solver.search_permutation` on the consumer's |weights|.
  It is applied to the producer's output channels (weight, bias), to per-channel constants in the region
  (shared constants are copied first), and to the consumer's input channels. It is kept only when it keeps
  more magnitude than the original order.

Result: :attr:`PermuteChannelsPass.kept` — consumer name → share of |W| a magnitude 2:4 mask keeps, before
and after.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes.sparsify import Layer, layer_view
from edgeq.sparse24 import GROUP, kept_magnitude
from edgeq.sparse_solver import search_permutation

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Erf", "Gelu", "Elu", "Selu", "Softplus", "HardSigmoid",
         "HardSwish", "Abs", "Neg", "Exp", "Sqrt", "Identity"}
BINARY = {"Add", "Sub", "Mul", "Div", "PRelu", "Pow"}
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


class _Region:
    """The producer and the nodes between it and a consumer, or why there is none."""

    def __init__(self, consumer: Layer):
        self.producer: Layer | None = None
        self.nodes: list[ir.Node] = []
        self.constants: list[tuple[ir.Node, int, int]] = []  # (node, input index, channel axis of the constant)
        self.why_not = self._walk(consumer)

    def _walk(self, consumer: Layer) -> str:
        start = consumer.node.inputs[0]
        stack, seen = [start], {start}
        values = []
        while stack:
            value = stack.pop()
            values.append(value)
            node = value.producer()
            if node is None:
                return "input comes from outside the graph"
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                producer = layer_view(node)
                if isinstance(producer, str):
                    return f"producer {node.name}: {producer}"
                if self.producer is not None and self.producer.node is not node:
                    return "two producers"
                self.producer = producer
                continue
            if node.op_type not in UNARY | BINARY | POOLING:
                return f"{node.op_type} {node.name} mixes channels"
            if node not in self.nodes:
                self.nodes.append(node)
            for index, inp in enumerate(node.inputs):
                if inp is None:
                    continue
                if inp.const_value is not None:
                    self.constants.append((node, index, -1))
                elif inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        if self.producer is None:
            return "no producer layer"
        if self.producer.node.op_type != "Conv" and any(n.op_type in POOLING for n in self.nodes):
            return "pooling after a MatMul/Gemm"
        inside = {*self.nodes, consumer.node}
        for value in values:
            if value.is_graph_output():
                return f"{value.name} is a graph output"
            for user, index in value.uses():
                if user not in inside or (user is consumer.node and index != 0):
                    return f"{value.name} is read by {user.name}"
        for node in self.nodes:
            if any(len(list(out.uses())) or out.is_graph_output() for out in node.outputs[1:]):
                return f"{node.name} has a second output in use"
        return self._channel_axes()

    def _channel_axes(self) -> str:
        """Check every constant is a scalar or a per-channel vector; note the axis to permute (-1: none)."""
        producer = self.producer
        rank = producer.array.ndim if producer.node.op_type == "Conv" else 1  # from the right: C·1·1…
        channels = producer.out_channels
        checked = []
        for node, index, _ in self.constants:
            shape = tuple(node.inputs[index].const_value.shape)
            if all(d == 1 for d in shape):
                checked.append((node, index, -1))
                continue
            axis = len(shape) - (rank - 1) if producer.node.op_type == "Conv" else len(shape) - 1
            if axis < 0 or shape[axis] != channels or any(d != 1 for i, d in enumerate(shape) if i != axis):
                return f"constant {node.inputs[index].name} {list(shape)} is not per channel"
            checked.append((node, index, axis))
        self.constants = checked
        return ""


def _permute_const(graph: ir.Graph, node: ir.Node, index: int, axis: int, perm: np.ndarray) -> None:
    value = node.inputs[index]
    array = np.take(value.const_value.numpy(), perm, axis=axis)
    if len(list(value.uses())) == 1:
        value.const_value = ir.tensor(array, name=value.name)
        return
    copy = ir.Value(name=f"{value.name}_{node.name}_permuted", shape=value.shape, type=value.type,
                    const_value=ir.tensor(array, name=f"{value.name}_{node.name}_permuted"))
    graph.register_initializer(copy)
    node.replace_input_with(index, copy)


def kept_share(weight: np.ndarray, in_axis: int) -> float:
    """Share of Σ|W| that a magnitude 2:4 mask along ``in_axis`` keeps."""
    magnitudes = np.abs(np.moveaxis(weight, in_axis, -1)).reshape(-1, weight.shape[in_axis])
    total = float(magnitudes.sum())
    kept = float(kept_magnitude(magnitudes.reshape(magnitudes.shape[0], -1, GROUP)).sum())
    return kept / total if total else 1.0


class PermuteChannelsPass(ir.passes.InPlacePass):
    def __init__(self, consumers: set[str], seed: int = 0):
        super().__init__()
        self.consumers, self.seed = consumers, seed
        self.kept: dict[str, dict] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.name not in self.consumers:
                continue
            consumer = layer_view(node)
            region = _Region(consumer)
            if region.why_not:
                self.kept[node.name] = {"permuted": False, "reason": region.why_not}
                continue
            weight = consumer.array
            magnitudes = np.abs(np.moveaxis(weight, consumer.in_axis, -1)).reshape(-1, consumer.in_channels)
            perm = search_permutation(magnitudes, self.seed)
            before, after = kept_share(magnitudes, 1), kept_share(magnitudes[:, perm], 1)
            self.kept[node.name] = {"permuted": after > before, "kept_before": before, "kept_after": after,
                                    "reason": "" if after > before else "no order keeps more"}
            if after <= before:
                continue
            producer = region.producer
            _permute_const(model.graph, producer.node, 1, producer.out_axis, perm)
            bias = producer.node.inputs[2] if len(producer.node.inputs) > 2 else None
            if bias is not None and bias.const_value is not None and bias.const_value.shape[-1] == len(perm):
                _permute_const(model.graph, producer.node, 2, -1, perm)
            for inner, index, axis in region.constants:
                if axis >= 0:
                    _permute_const(model.graph, inner, index, axis, perm)
            _permute_const(model.graph, node, 1, consumer.in_axis, perm)
            modified = True
        return ir.passes.PassResult(model, modified=modified)
