"""Make a QDQ model's quantization switchable at run time, site by site: one model stands for every build that
quantizes a subset of it (what a sensitivity table measures one group at a time).

Rules:
1. Sites: each main-graph activation Q→DQ pair, named by the tensor it quantizes (the name that tensor has in
   the float model), and each node's dequantized constant input (a weight, a bias), named by the node.
2. A site's users read ``If(gate)``: its ``then`` branch rounds (the activation's Q→DQ pair, moved there;
   a weight's or bias's DequantizeLinear), its ``else`` branch passes the float value on — the tensor itself,
   or the float model's constant (same node name, same input). ``gate`` is element ``index`` of the bool
   vector input :data:`GATES`. A gate that is off computes nothing (an elementwise ``Where`` would touch every
   element of every activation and weight in every trial, several times the float model's run).
3. An activation's producer moves into both branches where the activation has no other reader (a main-graph
   node with one output, no subgraph, not a Q/DQ): the ``else`` branch computes it instead of copying it
   (ONNX Runtime copies a value a branch passes on; on an EfficientNet-style CNN those copies were a third of
   a trial: 21.1 → 14.1 ms with every gate off).
4. All gates off computes the float model; a gate on adds exactly that site's rounding, with the build's own
   scales, zero points and integers. The arithmetic is float (fake quantization): no integer kernel runs, so
   the figures are those of the quantized function, not of a kernel's accumulation.
5. Preconditions (else ``ValueError``, and the caller builds each subset instead): no Q/DQ inside a subgraph,
   and every dequantized constant has its float original in the float model.

Results: :attr:`sites` (site name → gate index).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from edgeq.passes.insert_qdq import constant_dequantize

GATES = "edgeq_gates"


def _is_qdq(node: ir.Node) -> bool:
    return node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx")


class GateQDQPass(ir.passes.InPlacePass):
    def __init__(self, float_model: ir.Model):
        super().__init__()
        self.float_nodes = {n.name: n for n in float_model.graph}
        self.sites: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.graph is not graph and _is_qdq(node):
                raise ValueError(f"{node.name}: Q/DQ inside a subgraph cannot be gated")
        self._gates = ir.Value(name=GATES, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([None]))
        self._gate_values: dict[str, ir.Value] = {}
        for node in list(graph):  # constants first: a producer that moves into a branch takes its gated inputs
            for index, value in enumerate(node.inputs):
                if not _is_qdq(node) and constant_dequantize(value) is not None:
                    self._gate_constant(graph, node, index)
        for node in list(graph):
            if node.op_type == "DequantizeLinear" and _is_qdq(node) and constant_dequantize(node.outputs[0]) is None:
                self._gate_pair(graph, node)
        self._gates.shape = ir.Shape([len(self.sites)])
        graph.inputs.append(self._gates)
        common.RemoveUnusedNodesPass()(model)  # the weights' DequantizeLinear nodes, each copied into its Ifs
        common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.sites))

    def _gate(self, graph: ir.Graph, site: str) -> ir.Value:
        """The scalar gate of ``site`` (one Gather per site)."""
        if site not in self._gate_values:
            self.sites[site] = len(self.sites)
            index = ir.Value(name=f"{site}_gate_index",
                             const_value=ir.tensor(np.array(self.sites[site], dtype=np.int64)))
            graph.register_initializer(index)
            gather = ir.Node("", "Gather", [self._gates, index], name=f"{site}_gate", num_outputs=1)
            gather.outputs[0].name, gather.outputs[0].dtype = f"{site}_gate", ir.DataType.BOOL
            graph.append(gather)
            self._gate_values[site] = gather.outputs[0]
        return self._gate_values[site]

    def _switch(self, graph: ir.Graph, site: str, rounding: list[ir.Node], passing: list[ir.Node], name: str,
                shape: ir.Shape | None) -> ir.Value:
        """``If(gate)``: the ``rounding`` nodes (their last output: the dequantized value) in the ``then``
        branch, the ``passing`` nodes (their last output: the float value) in the ``else`` branch; returns the
        If's output."""
        rounded, kept = rounding[-1].outputs[0], passing[-1].outputs[0]
        kept.name, rounded.name = f"{name}_float", f"{name}_dequantized"
        kept.dtype = rounded.dtype = ir.DataType.FLOAT
        branches = [ir.AttrGraph(branch, ir.Graph([], [nodes[-1].outputs[0]], nodes=nodes, name=f"{name}_{branch}"))
                    for branch, nodes in (("then_branch", rounding), ("else_branch", passing))]
        switch = ir.Node("", "If", [self._gate(graph, site)], branches, num_outputs=1, name=f"{name}_If")
        value = switch.outputs[0]
        value.name, value.dtype, value.shape = name, ir.DataType.FLOAT, shape
        graph.append(switch)
        return value

    @staticmethod
    def _passed_on(value: ir.Value, name: str) -> ir.Node:
        return ir.Node("", "Identity", [value], num_outputs=1, name=f"{name}_ungated")

    @staticmethod
    def _movable(value: ir.Value, quantize: ir.Node, graph: ir.Graph) -> ir.Node | None:
        """``value``'s producer where it can move into the branches (rule 3)."""
        producer = value.producer()
        if (producer is None or producer.graph is not graph or len(producer.outputs) != 1 or _is_qdq(producer)
                or value.is_graph_output() or list(value.uses()) != [(quantize, 0)]
                or any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for attr in producer.attributes.values())):
            return None
        return producer

    @staticmethod
    def _copy(node: ir.Node, suffix: str) -> ir.Node:
        copy = ir.Node(node.domain, node.op_type, node.inputs, node.attributes.values(), overload=node.overload,
                       num_outputs=1, version=node.version, name=f"{node.name}_{suffix}")
        copy.outputs[0].dtype, copy.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        return copy

    def _gate_pair(self, graph: ir.Graph, dq: ir.Node) -> None:
        quantize = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or len(list(quantize.outputs[0].uses())) != 1:
            raise ValueError(f"{dq.name}: a DequantizeLinear of activations not fed by a QuantizeLinear of its own")
        original, dequantized = quantize.inputs[0], dq.outputs[0]
        output = dequantized.is_graph_output()  # InsertQDQ gave the graph output's name to the DQ
        site = dequantized.name if output else original.name
        producer = self._movable(original, quantize, graph)
        if producer is None:
            rounding, passing, rounded = [], [self._passed_on(original, f"{site}_gated")], original
        else:
            rounding, passing = [self._copy(producer, "gate_rounded")], [self._copy(producer, "gate_float")]
            rounded = rounding[0].outputs[0]
            rounded.name = f"{site}_gate_produced"
        rounding.append(ir.Node("", "QuantizeLinear", [rounded, *quantize.inputs[1:]], quantize.attributes.values(),
                                num_outputs=1, name=quantize.name))
        rounding[-1].outputs[0].name = f"{site}_gate_quantized"
        rounding.append(ir.Node("", "DequantizeLinear", [rounding[-1].outputs[0], *dq.inputs[1:]],
                                dq.attributes.values(), num_outputs=1, name=dq.name))
        gated = self._switch(graph, site, rounding, passing, f"{site}_gated", original.shape)
        for user, index in list(dequantized.uses()):
            user.replace_input_with(index, gated)
        if output:
            graph.outputs[list(graph.outputs).index(dequantized)] = gated
            gated.name = site
        graph.remove([dq, quantize] + ([producer] if producer is not None else []), safe=True)

    def _gate_constant(self, graph: ir.Graph, node: ir.Node, index: int) -> None:
        reference = self.float_nodes.get(node.name)
        value = reference.inputs[index] if reference is not None and index < len(reference.inputs) else None
        if value is None or value.const_value is None:
            raise ValueError(f"{node.name}: input {index} has no float constant in the float model")
        original = ir.Value(name=f"{node.name}_float_input{index}", const_value=value.const_value)
        graph.register_initializer(original)
        dq = node.inputs[index].producer()
        rounding = [ir.Node("", "DequantizeLinear", dq.inputs, dq.attributes.values(), num_outputs=1,
                            name=f"{node.name}_input{index}_DequantizeLinear")]
        name = f"{node.name}_gated_input{index}"
        node.replace_input_with(index, self._switch(graph, node.name, rounding, [self._passed_on(original, name)],
                                                    name, original.shape))
