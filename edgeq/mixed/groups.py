"""Decision groups: the layers that take one precision together.

Rules:
- A layer is a compute node (Conv, Gemm, MatMul, …; in subgraphs too) or an embedding Gather (its table int8)
  that the uniform int8 build quantized: a node the target cannot run in int8, or that the user excluded,
  offers no choice and is not a layer.
- Layers that read one constant weight share a group (a stored weight has one precision).
- Layers whose outputs (or their fused Relu/Clip) meet in one Concat share a group: integer Concat kernels on
  fixed-point targets want one type across the inputs. Dynamic int8 layers output float, and join no Concat
  group (a 3-layer LSTM's final states are concatenated: its first layer, reading raw mel power, lost 2.8 dB
  in int8 and took the two others, which held, back to float with it).
- Residual Adds do not group their branches: an Add joins int8 when a neighbour is int8 (InsertQDQ growth),
  and grouping every branch of a residual chain would make whole ResNet stages one choice.
- A group's time counts its members and the activation each member's output alone feeds (ORT fuses
  Conv/Gemm + Relu, Clip, Sigmoid, … into one float kernel, and the Q→DQ pair moves past Relu/Clip in int8).
- A group offers a precision only when every member supports it (int4: MatMuls with a 2-D constant weight
  whose reduction axis is a multiple of the block size; fp16: a constant float32 weight, not an embedding's
  table). ``float`` and ``int8`` are always offered when the target lists them, ``int16`` unless an LSTM
  (dynamic int8 only) or an embedding (int8 rows only) is a member.
- Bytes per precision count the group's weights and biases as stored: float as in the model; int8 one byte
  per weight plus a float scale and a zero point per channel, int32 biases with their scales; int4 half a byte
  per weight plus a float scale and a 4-bit zero point per block; fp16 two bytes per weight, biases as they are.
  An LSTM's weights are W and R (a scale and a zero point per gate row and direction); its bias stays float.
  An embedding's table in int8 is one byte per value and a float scale per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgeq.passes.insert_qdq import DYNAMIC, EMBEDDING, Decision, int4_ineligible, weight_channel_axis

FUSED_ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid")


@dataclass
class Group:
    name: str
    nodes: tuple[str, ...]
    op_type: str
    precisions: tuple[str, ...]
    bytes: dict[str, int] = field(default_factory=dict)
    timed: tuple[str, ...] = ()  # the members and their fused activations: where the group's time is found


class _UnionFind:
    def __init__(self, items):
        self.parent = {i: i for i in items}

    def find(self, item):
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


def layer_groups(model: ir.Model, decisions: dict[str, Decision], candidates: tuple[str, ...],
                 fusions: tuple[str, ...], int4_block: int) -> list[Group]:
    """The decision groups of ``model``, in graph order, from the uniform int8 build's ``decisions``."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))  # subgraphs (If, Loop, Scan) too
    layers = {n.name: n for n in nodes if n.name in decisions and decisions[n.name].quantized
              and decisions[n.name].reason in ("compute", EMBEDDING)}
    sets = _UnionFind(layers)
    by_weight: dict[str, str] = {}
    for name, node in layers.items():
        weight = _weight(node)
        if weight is not None and weight.const_value is not None:
            sets.union(name, by_weight.setdefault(weight.name, name))
    for node in nodes:
        if node.op_type == "Concat":
            makers = [m for m in (_maker(v, fusions) for v in node.inputs)
                      if m in layers and decisions[m].precision != DYNAMIC]
            for other in makers[1:]:
                sets.union(other, makers[0])
    members: dict[str, list[ir.Node]] = {}
    for name, node in layers.items():
        members.setdefault(sets.find(name), []).append(node)
    groups = []
    for nodes in members.values():
        offered = tuple(p for p in candidates if p in ("float", "int8") or
                        (p == "int16" and all(n.op_type not in ("LSTM", "Gather") for n in nodes)) or
                        (p == "int4" and all(int4_ineligible(n, int4_block) is None for n in nodes)) or
                        (p == "fp16" and all(_float_weight(n) for n in nodes)))
        group = Group(nodes[0].name, tuple(n.name for n in nodes),
                      "+".join(dict.fromkeys(n.op_type for n in nodes)), offered)
        group.bytes = {p: _stored_bytes(nodes, p, int4_block) for p in offered}
        group.timed = group.nodes + tuple(a.name for a in map(_fused_activation, nodes) if a is not None)
        groups.append(group)
    return groups


def _weight(node: ir.Node) -> ir.Value | None:
    """A layer's constant weight slot: an embedding's table, else input 1."""
    if node.op_type == "Gather":
        return node.inputs[0]
    return node.inputs[1] if len(node.inputs) > 1 else None


def _float_weight(node: ir.Node) -> bool:
    """Whether input 1 is a constant float32 weight, as fp16 storage serves (an embedding's table is not)."""
    weight = node.inputs[1] if node.op_type != "Gather" and len(node.inputs) > 1 else None
    return weight is not None and weight.const_value is not None and weight.const_value.dtype == ir.DataType.FLOAT


def _fused_activation(node: ir.Node) -> ir.Node | None:
    users = list(node.outputs[0].uses())
    if len(users) == 1 and users[0][0].op_type in FUSED_ACTIVATIONS and not node.outputs[0].is_graph_output():
        return users[0][0]
    return None


def _maker(value: ir.Value | None, fusions: tuple[str, ...]) -> str | None:
    """The node that makes ``value``, looking through one fused activation."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type in fusions and producer.inputs and producer.inputs[0] is not None:
        inner = producer.inputs[0].producer()
        return inner.name if inner is not None else producer.name
    return producer.name if producer is not None else None


def _stored_bytes(nodes: list[ir.Node], precision: str, int4_block: int) -> int:
    total, seen = 0, set()
    for node in nodes:
        if node.op_type == "Gather":  # an embedding: int8 values and a float scale per row
            table = node.inputs[0]
            if table.name not in seen:
                seen.add(table.name)
                size = int(np.prod(table.const_value.shape))
                total += table.const_value.nbytes if precision == "float" else size + 4 * table.const_value.shape[0]
            continue
        lstm = node.op_type == "LSTM"
        weights = (1, 2) if lstm else (1,)
        for index, value in enumerate(node.inputs[1:4 if lstm else 3], start=1):
            if value is None or value.const_value is None or value.name in seen:
                continue
            seen.add(value.name)
            array = value.const_value
            size = int(np.prod(array.shape)) if array.shape.dims else 1
            if precision == "float" or (index not in weights and (precision == "fp16" or lstm)):
                total += array.nbytes
            elif precision == "fp16":
                total += 2 * size
            elif index not in weights:  # bias: int32 values, a float scale each, an int32 zero point each
                total += 12 * size
            elif lstm:  # int8 rows, a scale and a zero point per gate row and direction
                total += size + 5 * int(array.shape[0] * array.shape[1])
            elif precision in ("int8", "int16"):  # W8A8 and W8A16 store the same int8 weights
                total += size + 5 * int(array.shape[weight_channel_axis(node, len(array.shape))])
            else:  # int4: K × N weight in blocks of int4_block rows
                total += size // 2 + (size // int4_block) * 9 // 2
    return total
