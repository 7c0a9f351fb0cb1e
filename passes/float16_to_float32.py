"""Make a model that computes in float16 compute in float32, its interface unchanged.

Exporters write half-precision models (``model.half()``, float16 converters for GPUs); int8 quantization and
its calibration, sensitivity and fidelity figures work on float32, the precision every integer kernel
dequantizes to. Rules:
- float16 initializers and the float16 tensors of ``Constant``/``ConstantOfShape`` become float32 (exact:
  every float16 number is a float32 number);
- ops that make a tensor of a named type make float32 where they made float16: ``Cast``'s ``to``, the ``dtype``
  of ``EyeLike`` and the ``Random*`` ops;
- every float16 value inside the graph (subgraphs included) is retyped float32;
- a float16 graph input stays float16 and feeds a ``Cast`` to float32 that its readers read instead; a
  float16 graph output keeps its name and type and is made by a ``Cast`` back to float16 — so feeds and
  callers are the same as before.
The model then computes the same function more precisely: it differs from the original by float16's own
rounding, not by a change of function (``converted`` says how many tensors and ops were rewritten).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

HALF, FULL = ir.DataType.FLOAT16, ir.DataType.FLOAT
_TYPED_OPS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
              "RandomNormalLike": "dtype", "RandomUniformLike": "dtype"}
_TENSOR_ATTRIBUTES = {"Constant": "value", "ConstantOfShape": "value"}


def _full(tensor: ir.TensorProtocol) -> ir.Tensor:
    return ir.Tensor(tensor.numpy().astype(np.float32), name=tensor.name)


class Float16ToFloat32Pass(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.converted = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        half_outputs = [i for i, v in enumerate(graph.outputs) if v.dtype == HALF and v not in graph.inputs]
        for g in (graph, *graph.subgraphs()):
            for value in g.initializers.values():
                if value.const_value is not None and value.const_value.dtype == HALF:
                    value.const_value = _full(value.const_value)
                    value.dtype = FULL
                    self.converted += 1
        inner = [v for g in graph.subgraphs() for v in (*g.inputs, *g.outputs)]
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self._retype(node)
            inner += node.outputs
        for value in inner:
            if value.dtype == HALF:  # every float16 value comes from something counted above or below
                value.dtype = FULL
        for value in graph.inputs:
            if value.dtype == HALF:
                self._cast_input(graph, value)
        for index in half_outputs:
            self._cast_output(graph, index, graph.outputs[index])
        if self.converted:
            graph.sort()  # the input casts were appended
        return ir.passes.PassResult(model, modified=bool(self.converted))

    def _retype(self, node: ir.Node) -> None:
        attribute = node.attributes.get(_TYPED_OPS.get(node.op_type, ""))
        if attribute is not None and attribute.value == HALF:
            node.attributes[attribute.name] = ir.AttrInt64(attribute.name, FULL)
            self.converted += 1
        attribute = node.attributes.get(_TENSOR_ATTRIBUTES.get(node.op_type, ""))
        if attribute is not None and attribute.value is not None and attribute.value.dtype == HALF:
            node.attributes[attribute.name] = ir.AttrTensor(attribute.name, _full(attribute.value))
            self.converted += 1

    def _cast_input(self, graph: ir.Graph, value: ir.Value) -> None:
        uses = list(value.uses())
        cast = ir.node("Cast", [value], attributes={"to": FULL}, name=f"{value.name}_to_float32")
        cast.outputs[0].name, cast.outputs[0].dtype = f"{value.name}_float32", FULL
        cast.outputs[0].shape = value.shape
        for user, index in uses:
            user.replace_input_with(index, cast.outputs[0])
        graph.append(cast)
        self.converted += 1

    def _cast_output(self, graph: ir.Graph, index: int, value: ir.Value) -> None:
        name = value.name
        value.name = f"{name}_float32"
        cast = ir.node("Cast", [value], attributes={"to": HALF}, name=f"{name}_to_float16")
        cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, HALF, value.shape
        graph.append(cast)
        graph.outputs[index] = cast.outputs[0]
        self.converted += 1
