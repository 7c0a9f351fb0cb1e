"""Convert a model's default-domain opset, node by node, so that every node means what it meant before.

Every opset change in edgeq goes through this pass (normalize's upgrade to 13, the opset 21 that int4 and int16
builds need). Relabelling the opset import alone is wrong for the ops whose signature changed; those are
rewritten here, at the boundary where each changed, in every graph and subgraph:

1. Attributes that became inputs: Slice (10: starts/ends/axes/steps), TopK (10: k), Clip (11: min/max), Pad
   (11: pads/value), Dropout (12: ratio), Squeeze/Unsqueeze/ReduceSum (13: axes), Split (13: split),
   ReduceMean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare (18: axes). The new inputs are ``Constant`` nodes.
2. Split without sizes gets ``num_outputs`` (18 requires one of the two).
3. Softmax/LogSoftmax/Hardmax (13) no longer flatten the input to 2-D at ``axis``: the last axis keeps its
   meaning by a new ``axis``; any other axis becomes Flatten → op → Reshape back to the input's shape.
4. Removed ops become their successors: Upsample (10) → Resize (as opset 10 defines it: asymmetric
   coordinates, nearest rounds down), Scatter (11) → ScatterElements; Resize from opset 10 gains the empty
   ``roi`` input (11) and keeps opset 10's coordinates. ``BatchNormalization``'s ``spatial`` (dropped at 9)
   is removed when it is 1 (the only value ONNX Runtime ran); RoiAlign (16) keeps opset 10's
   ``output_half_pixel`` coordinates. An opset-8 ``Scan`` (batched) has no equivalent and is refused.
5. Above 18, onnxscript's version converter takes over (it is right there: DFT, GridSample and
   GroupNormalization are the ops it adapts).

A model that imports no default-domain opset (a tree ensemble written with ``ai.onnx.ml`` ops only, as
onnxmltools writes XGBoost) has nothing to convert: it imports ``target``. Down to a lower opset (a model the
newest onnx wrote, for a runtime that reads less) only by relabelling, where no op the model uses changed in
between; otherwise, and below opset 7, a :class:`UserError`. Value names are kept, so an original and a
converted model can be compared value by value (:mod:`edgeq.model_check`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

from edgeq.errors import UserError

MIN_SOURCE_OPSET = 7
ONNXSCRIPT_FROM = 18  # onnxscript's converter handles 18 → 25
_REDUCE_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")
_FLATTENING = ("Softmax", "LogSoftmax", "Hardmax")

# An adapter rewrites one node in place, or replaces it and returns the node that took its place.
Adapter = Callable[[ir.Node], "ir.Node | None"]


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _constant(node: ir.Node, array: np.ndarray, tag: str) -> ir.Value:
    """A Constant node holding ``array``, inserted before ``node`` in its graph."""
    const = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(array))],
                    name=f"{node.name}_{tag}", num_outputs=1)
    const.outputs[0].name = f"{node.name}_{tag}"
    node.graph.insert_before(node, const)
    return const.outputs[0]


def _set_input(node: ir.Node, index: int, value: ir.Value | None) -> None:
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _attr_to_input(name: str, index: int, dtype=np.int64, default=None) -> Adapter:
    """Move the attribute ``name`` to input ``index`` (a 1-D constant of ``dtype``; scalar for float dtypes)."""

    def adapt(node: ir.Node) -> None:
        attr = node.attributes.pop(name, None)
        if attr is None and default is None:
            return
        value = default if attr is None else attr.value
        array = np.asarray(value, dtype=dtype)
        if np.issubdtype(dtype, np.integer):
            array = array.reshape(-1)
        _set_input(node, index, _constant(node, array, name))
    return adapt


def _slice_10(node: ir.Node) -> None:
    for index, name in enumerate(("starts", "ends", "axes"), start=1):
        _attr_to_input(name, index)(node)


def _clip_11(node: ir.Node) -> None:
    dtype = _dtype_of(node.inputs[0])
    for index, name in ((1, "min"), (2, "max")):
        attr = node.attributes.pop(name, None)
        if attr is not None:
            _set_input(node, index, _constant(node, np.asarray(attr.as_float(), dtype), name))


def _pad_11(node: ir.Node) -> None:
    pads = node.attributes.pop("pads", None)
    value = node.attributes.pop("value", None)
    _set_input(node, 1, _constant(node, np.asarray(pads.as_ints() if pads else [], np.int64), "pads"))
    if value is not None and value.as_float() != 0.0:
        _set_input(node, 2, _constant(node, np.asarray(value.as_float(), _dtype_of(node.inputs[0])), "value"))


def _dtype_of(value: ir.Value | None):
    if value is not None and value.dtype is not None:
        return value.dtype.numpy()
    return np.float32


def _split_18(node: ir.Node) -> None:
    if (len(node.inputs) < 2 or node.inputs[1] is None) and "num_outputs" not in node.attributes:
        node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))


def _flattening_13(node: ir.Node) -> ir.Node | None:
    """Before 13 these ops flattened to [prod(dims[:axis]), prod(dims[axis:])] and normalized the second axis."""
    axis = node.attributes.get_int("axis", 1)
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if rank is not None and axis % rank == rank - 1:
        node.attributes["axis"] = ir.AttrInt64("axis", -1)
        return
    graph, out = node.graph, node.outputs[0]
    flatten = ir.Node("", "Flatten", [x], attributes=[ir.AttrInt64("axis", axis)], name=f"{node.name}_flatten",
                      num_outputs=1)
    flatten.outputs[0].name = f"{node.name}_flat"
    flat_op = ir.Node("", node.op_type, [flatten.outputs[0]], attributes=[ir.AttrInt64("axis", -1)],
                      name=f"{node.name}_2d", num_outputs=1)
    flat_op.outputs[0].name = f"{out.name}_2d"
    shape = ir.Node("", "Shape", [x], name=f"{node.name}_shape", num_outputs=1)
    shape.outputs[0].name = f"{node.name}_input_shape"
    reshape = ir.Node("", "Reshape", [flat_op.outputs[0], shape.outputs[0]], name=node.name, num_outputs=1)
    graph.insert_before(node, [flatten, flat_op, shape, reshape])
    _take_over(node, reshape)
    return reshape


def _take_over(old: ir.Node, new: ir.Node) -> None:
    """``new`` replaces ``old``: its output takes the old output's uses, name and type; ``old`` is removed."""
    before, after = old.outputs[0], new.outputs[0]
    name, dtype, shape = before.name, before.dtype, before.shape
    ir.convenience.replace_all_uses_with(before, after, replace_graph_outputs=True)
    before.name = f"{name}_before_conversion"
    after.name, after.dtype, after.shape = name, dtype, shape
    old.graph.remove(old, safe=True)


def _rename_op(new_type: str) -> Adapter:
    def adapt(node: ir.Node) -> ir.Node:
        new = ir.Node("", new_type, node.inputs, attributes=list(node.attributes.values()), name=node.name,
                      num_outputs=len(node.outputs))
        node.graph.insert_before(node, new)
        _take_over(node, new)
        return new
    return adapt


def _resize_11(node: ir.Node) -> None:
    """Opset 10's Resize: (X, scales), asymmetric coordinates, nearest rounds down."""
    scales = node.inputs[1] if len(node.inputs) > 1 else None
    _set_input(node, 2, scales)
    node.replace_input_with(1, _constant(node, np.zeros((0,), np.float32), "roi"))
    node.attributes["coordinate_transformation_mode"] = ir.AttrString("coordinate_transformation_mode", "asymmetric")
    if node.attributes.get_string("mode", "nearest") == "nearest":
        node.attributes["nearest_mode"] = ir.AttrString("nearest_mode", "floor")


def _batchnorm_9(node: ir.Node) -> None:
    spatial = node.attributes.pop("spatial", None)
    if spatial is not None and spatial.as_int() != 1:
        raise UserError(f"node '{node.name}' (BatchNormalization) uses spatial=0, which no opset from 9 on can say",
                        "re-export the model with a recent exporter")


def _scan_9(node: ir.Node) -> None:
    raise UserError(f"node '{node.name}' is an opset-8 Scan (batched, with sequence lengths), which later opsets "
                    "cannot express node for node", "re-export the model at opset 9 or later")


def _roialign_16(node: ir.Node) -> None:
    if "coordinate_transformation_mode" not in node.attributes:
        node.attributes["coordinate_transformation_mode"] = ir.AttrString(
            "coordinate_transformation_mode", "output_half_pixel")


# (op type, first opset with the new signature) → adapter; applied in opset order.
ADAPTERS: dict[tuple[str, int], Adapter] = {
    ("BatchNormalization", 9): _batchnorm_9,
    ("Scan", 9): _scan_9,
    ("Upsample", 9): _attr_to_input("scales", 1, np.float32),
    ("Upsample", 10): _rename_op("Resize"),
    ("Slice", 10): _slice_10,
    ("TopK", 10): _attr_to_input("k", 1),
    ("Clip", 11): _clip_11,
    ("Pad", 11): _pad_11,
    ("Resize", 11): _resize_11,
    ("Scatter", 11): _rename_op("ScatterElements"),
    ("Dropout", 12): _attr_to_input("ratio", 1, np.float32),
    ("Squeeze", 13): _attr_to_input("axes", 1),
    ("Unsqueeze", 13): _attr_to_input("axes", 1),
    ("ReduceSum", 13): _attr_to_input("axes", 1),
    ("Split", 13): _attr_to_input("split", 1),
    **{(op, 13): _flattening_13 for op in _FLATTENING},
    ("RoiAlign", 16): _roialign_16,
    ("Split", 18): _split_18,
    **{(op, 18): _attr_to_input("axes", 1) for op in _REDUCE_18},
}
def _adapt_node(node: ir.Node, source: int, target: int) -> None:
    """Apply every adapter between ``source`` and ``target`` in order (an Upsample that became a Resize at 10
    then gets Resize's adapters)."""
    for boundary in range(source + 1, target + 1):
        adapter = ADAPTERS.get((node.op_type, boundary))
        if adapter is not None:
            node = adapter(node) or node


def _signature(schema: onnx.defs.OpSchema) -> tuple:
    """What an op's schema says beside its types: inputs and outputs (name, optional or variadic) and
    attributes (name, type, required, default)."""
    return (tuple((i.name, i.option) for i in schema.inputs), tuple((o.name, o.option) for o in schema.outputs),
            tuple(sorted((name, a.type, a.required, a.default_value.SerializeToString())
                         for name, a in schema.attributes.items())))


class ConvertOpsetPass(ir.passes.InPlacePass):
    """Upgrade the default-domain opset to ``target``, or relabel it down (rules in the module docstring)."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not {"", "ai.onnx"} & set(model.opset_imports):
            model.opset_imports[""] = self.target  # no default-domain node to adapt
            return ir.passes.PassResult(model, modified=True)
        source = default_opset(model)
        if source == self.target:
            return ir.passes.PassResult(model, modified=False)
        if source > self.target:
            return self._relabel_down(model, source)
        if source < MIN_SOURCE_OPSET:
            raise UserError(f"the model is at opset {source}, older than {MIN_SOURCE_OPSET}",
                            "re-export it with a recent exporter (opset 13 or later)")
        upto = min(self.target, max(source, ONNXSCRIPT_FROM))
        for graph in [model.graph, *model.graph.subgraphs()]:
            for node in list(graph):
                if node.domain in ("", "ai.onnx") and node.graph is graph:
                    _adapt_node(node, node.version or source, upto)
                    node.version = None
        model.opset_imports.pop("ai.onnx", None)
        model.opset_imports[""] = upto
        if self.target > upto:
            ConvertVersionPass(self.target, fallback=False)(model)
        return ir.passes.PassResult(model, modified=True)

    def _relabel_down(self, model: ir.Model, source: int) -> ir.passes.PassResult:
        """Down by relabelling alone, where every default-domain op the model uses has at ``target`` the inputs,
        outputs and attributes it has at ``source`` (opset 28 widened the types of Celu, Einsum, … and changed
        nothing else; the runtime's load checks the types), else a :class:`UserError` naming the first that
        does not."""
        if source > onnx.defs.onnx_opset_version():
            raise UserError(f"the model is at opset {source}, which onnx {onnx.__version__} does not define yet "
                            f"(its newest: {onnx.defs.onnx_opset_version()})",
                            f"re-export the model at opset {self.target} or lower")
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                same = _signature(onnx.defs.get_schema(node.op_type, self.target)) == \
                    _signature(onnx.defs.get_schema(node.op_type, node.version or source))
            except onnx.defs.SchemaError:  # an op newer than ``target``
                same = False
            if not same:
                raise UserError(f"the model is at opset {source}; node '{node.name}' ({node.op_type}) changed after "
                                f"opset {self.target}, the newest the runtime reads",
                                f"re-export the model at opset {self.target} or lower")
            node.version = None
        model.opset_imports.pop("ai.onnx", None)
        model.opset_imports[""] = self.target
        return ir.passes.PassResult(model, modified=True)
