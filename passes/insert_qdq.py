"""Insert QuantizeLinear/DequantizeLinear pairs where the target has integer kernels, and nowhere else.

Rules:
- Seeds: compute ops (Conv, ConvTranspose, Gemm, MatMul) whose activation inputs are float with a calibrated
  range. Conv/ConvTranspose need a constant weight; a MatMul/Gemm with two activation inputs (attention)
  quantizes both, unless the rules say ``activation_matmuls = false``.
- Growth: a requant op (Add, Concat, …; all inputs activations) or a passthrough op (MaxPool, Reshape, …;
  data input an activation, other inputs constant) joins only when it shares a tensor with a node already
  quantized. Nothing joins without a path to a compute op, so no Q→DQ pair is left between two float ops.
- Activation fusion: when a quantized node's output feeds exactly one Relu/Clip, the Q goes after that
  activation; ONNX Runtime folds the activation into the integer kernel's output clamp.
- Tensors: every activation input and (fused) output of a quantized node gets one Q→DQ pair shared by all of
  its consumers. A passthrough op's output reuses its input's scale and zero point (integers pass unchanged).
- Weights: symmetric int8, per output channel when the target asks (Conv axis 0, ConvTranspose axis 1,
  MatMul/Gemm the output-column axis); zeros stay exact zeros, and the weight's tensor annotations (a 2:4
  sparsity mark) move to its quantized tensor. Bias: int32 with scale s_input·s_weight and zero point 0.
- Activations: per tensor, asymmetric, or symmetric int8 when the target asks (TensorRT).
- Subgraphs at any depth (If branches, Loop and Scan bodies) are quantized by the same rules, each on its own
  (new weights are stored in the subgraph, named after it), wherever calibration gave their tensors ranges;
  compute nodes left float there are counted.
- A requant or passthrough op reading a tensor that held ±inf, NaN or a mask's stand-in for infinity on the
  calibration data (``unbounded``: the calibration's non-finite counts) stays float: integers keep none of
  them, so an attention mask added in int8 would mask nothing (a decoder's "all" op set fell to 4–9 dB).
- A node whose output is an angle — read by Sin or Cos, directly or through ops that only move or join
  values (Concat, Transpose, Reshape, Cast, Expand, …) — stays float, and so do those ops: a periodic function
  turns the angle's rounding into its whole output range (a rotary embedding's positions × frequencies over
  8 bits: a step of 0.4 rad; an optimum Llama's "all" op set fell to 19.9 dB).
- Nodes marked by :mod:`edgeq.passes.exclude`, or named in ``keep_float``, stay float — weights included: a
  float Conv/ConvTranspose/Gemm reading a dequantized activation reads it through its own DequantizeLinear
  with the scale repeated per channel, as ONNX Runtime gives a float weight after a per-tensor
  DequantizeLinear per-tensor int8 (its WeightBiasQuantization transformer).
- Per-node precisions (``precisions``, from the mixed-precision allocation or the op set; a node not named is
  int8; ``keep_float`` and exclusions win over them): ``float``
  stays float; ``int16`` is W8A16 — int8 weights, and every activation tensor the node reads or writes gets a
  16-bit Q→DQ pair (opset 21; for targets with 16-bit activation kernels); ``int4`` is weight-only — a
  MatMul's 2-D constant weight becomes asymmetric uint4 in blocks of ``int4_block_size`` rows along the reduction axis (a blocked DequantizeLinear, opset 21, which ONNX Runtime
  fuses into ``MatMulNBits``); its activations stay float and it takes no part in QDQ growth. ``fp16`` stores
  a node's constant weight in float16 with a Cast to float before use (half the bytes; what it computes in is
  the runtime's choice — TensorRT with fp16 enabled runs float layers in fp16 anyway). ``int8-dynamic`` is
  dynamic int8 for a MatMul/Gemm with a 2-D constant weight: the weight is stored in int8 (per column when the
  target is per channel), the activation is quantized per tensor at run time from its own range
  (DynamicQuantizeLinear, shared by every dynamic layer reading it) → MatMulInteger → Cast → Mul by the two
  scales [→ Add of a Gemm's bias], which ONNX Runtime fuses into ``DynamicQuantizeMatMul``; no calibrated range
  is needed, it takes no part in QDQ growth, and its decision's role is ``compute`` (it is a layer). An LSTM
  (constant 3-D float32 W and R, ``layout`` 0) in ``int8-dynamic`` becomes ONNX Runtime's
  ``com.microsoft.DynamicQuantizeLSTM`` under its own name: W and R symmetric int8 (per gate row and direction
  when the target is per channel, else per direction), stored transposed as the kernel reads them
  ([directions, input, 4·hidden]); X and the hidden state are quantized per step at run time; B, the initial
  states and the peepholes stay float. ONNX has no int8 LSTM: this is its only quantized form.
- Weights transposed at run time: a MatMul/Gemm whose weight a Transpose makes from one constant 2-D float32
  tensor (a tied embedding's output layer: exporters share the table and transpose it for the product) reads
  that constant transposed as a weight of its own, unless it stays float — per-channel int8 like any weight,
  where it was a second activation quantized per tensor, and the float table goes once nothing else reads it.
- Embedding tables: where the target gathers integers (``Gather`` among its passthrough ops), a Gather along
  axis 0 of a constant float32 table (rank ≥ 2, at least ``EMBEDDING_MIN_BYTES``) by indices computed at run
  time reads an int8 table instead — symmetric, one scale per row — as Gather(int8 rows) → Cast → Mul by
  Gather(row scales), its output under the Gather's name: a quarter of the bytes, the gathered rows alone
  dequantized. It is weight-only (activations stay float, no range is needed), in every int8 build unless
  ``precisions``, ``keep_float`` or an exclusion say float; its decision's role is ``embedding``. A smaller
  table saves too little to pay for three more kernels (~10 µs a run: 2% of a 0.5 ms language model whose
  128 KiB position table they would shrink).

Results: :attr:`decisions` (node name → quantized or why not) and :attr:`owners` (each inserted Q/DQ node →
the original node it serves), used to attribute measured kernel time back to original nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from edgeq.passes.convert_opset import default_opset
from edgeq.passes.exclude import EXCLUDE_KEY
from onnx_ir.passes import common

from edgeq.target import QuantizationRules

_NP_TYPES = {"uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16}
WIDE = {"uint8": "uint16", "int8": "int16"}  # the 16-bit activations of an "int16" (W8A16) node
_SUBGRAPH_OPS = ("If", "Loop", "Scan")


# Blocked DequantizeLinear, the 4-bit types and 16-bit Quantize/DequantizeLinear need this opset: a model
# given int4 or int16 precisions must have been converted to it (edgeq.passes.convert_opset), never relabelled.
WIDE_OPSET = 21
WIDE_OPSET_PRECISIONS = ("int4", "int16")
DYNAMIC = "int8-dynamic"
OUTSIDE_QDQ = ("int4", "fp16", DYNAMIC)  # precisions outside QDQ growth, rewritten node by node after it
_WEIGHT_QUANTIZED_BY_ORT = ("Conv", "ConvTranspose", "Gemm")  # float weights ORT quantizes after a DQ
MICROSOFT = "com.microsoft"  # ONNX Runtime's contrib ops
EMBEDDING = "embedding"  # the role of a Gather whose constant table is stored int8
EMBEDDING_MIN_BYTES = 1024 * 1024
_ROWS_AT_ONCE = 16384
PERIODIC_OPS = ("Sin", "Cos")
# Ops that only move, copy or join their data input(s): an angle stays an angle through them.
_ANGLE_CARRIERS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Concat", "Cast", "Expand",
                   "Identity", "Slice", "Gather", "Tile", "Split")


@dataclass(frozen=True)
class Decision:
    op_type: str
    quantized: bool
    reason: str
    precision: str = ""  # "int8", "int4", DYNAMIC, … or "float"; set from ``quantized`` when not given

    def __post_init__(self):
        if not self.precision:
            object.__setattr__(self, "precision", "int8" if self.quantized else "float")


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: str = "uint8"


def activation_qparams(lo: float, hi: float, dtype: str, symmetric: bool = False) -> QParams:
    """8- or 16-bit parameters for the range [lo, hi] (which contains 0): asymmetric, or symmetric signed
    (±127 / ±32767, zero point 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2 ** np.iinfo(_NP_TYPES[dtype]).bits - 1
    if symmetric:
        bound = max(-lo, hi)
        return QParams(float(np.float32(bound / (levels // 2))) if bound > 0 else 1.0, 0, dtype)
    qmin = int(np.iinfo(_NP_TYPES[dtype]).min)
    if hi - lo <= 0:
        return QParams(1.0, 0, dtype)
    scale = (hi - lo) / levels
    return QParams(float(np.float32(scale)), int(np.clip(round(qmin - lo / scale), qmin, qmin + levels)), dtype)


def weight_quantize(weight: np.ndarray, axis: int | None, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (±127, or ±63 with reduce_range) per channel along ``axis`` (None: per tensor)."""
    qmax = 63 if reduce_range else 127
    if axis is None:
        absmax = np.asarray(np.abs(weight).max(), dtype=np.float64)
    else:
        reduce = tuple(i for i in range(weight.ndim) if i != axis)
        absmax = np.abs(weight).max(axis=reduce).astype(np.float64)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def weight_channel_axis(node: ir.Node, rank: int) -> int:
    """The output-channel axis of a compute node's weight (input 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return rank - 1  # MatMul: columns of B


@dataclass
class ConstantDequantize:
    """A DequantizeLinear of constants (a quantized weight or bias): its integers and how they dequantize."""

    node: ir.Node
    integers: ir.Value
    scale: np.ndarray
    zero: np.ndarray | int
    axis: int | None
    block: int  # 0: one scale per channel (or per tensor); else blocks of this many along ``axis``

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Each integer's scale and zero point, broadcast to the integers' shape (float64)."""
        shape = tuple(self.integers.const_value.shape.numpy())
        scale, zero = self.scale.astype(np.float64), np.asarray(self.zero, dtype=np.float64)
        if self.block:
            scale = np.repeat(scale, self.block, axis=self.axis)[:shape[self.axis]]
            zero = np.repeat(zero, self.block, axis=self.axis)[:shape[self.axis]] if zero.ndim else zero
        elif self.axis is not None:
            broadcast = [1] * len(shape)
            broadcast[self.axis] = -1
            scale, zero = scale.reshape(broadcast), zero.reshape(broadcast) if zero.ndim else zero
        return np.broadcast_to(scale, shape), np.broadcast_to(zero, shape)

    def dequantized(self) -> np.ndarray:
        scale, zero = self.grid()
        return (self.integers.const_value.numpy().astype(np.float64) - zero) * scale


def constant_dequantize(value: ir.Value | None) -> ConstantDequantize | None:
    """The DequantizeLinear that makes ``value`` from constant inputs, if any."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    if any(v is None or v.const_value is None for v in inputs[:2]) or (inputs[2] is not None
                                                                          and inputs[2].const_value is None):
        return None
    scale = inputs[1].const_value.numpy()
    zero = inputs[2].const_value.numpy() if inputs[2] is not None else 0
    rank = len(inputs[0].const_value.shape)
    axis = node.attributes.get_int("axis", 1) if scale.size > 1 else None
    if axis is not None and axis < 0:
        axis += rank
    return ConstantDequantize(node, inputs[0], scale, zero, axis, node.attributes.get_int("block_size", 0))


def quantized_layers(model: ir.Model, layers: dict):
    """(node, its float layer from ``layers`` by name, its weight's :class:`ConstantDequantize`) for every
    main-graph node of ``layers`` whose weight this quantized model dequantizes from constants."""
    for node in model.graph:
        layer = layers.get(node.name)
        weight = constant_dequantize(node.inputs[1]) if layer is not None and len(node.inputs) > 1 else None
        if weight is not None:
            yield node, layer, weight


def int4_blockwise(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint4 per block of ``block`` rows of a [K, N] weight: (q [K, N], scale and zero point
    [K / block, N]). A block's range always contains 0, so zeros stay exact zeros."""
    k, n = weight.shape
    blocks = weight.reshape(k // block, block, n)
    lo, hi = np.minimum(blocks.min(axis=1), 0.0), np.maximum(blocks.max(axis=1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(blocks / scale[:, None, :]) + zero[:, None, :], 0, 15)
    return q.reshape(k, n).astype(np.uint8), scale, zero.astype(np.uint8)


def int4_ineligible(node: ir.Node, block: int) -> str | None:
    """Why int4 weight-only cannot serve this node, or None."""
    weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
    if weight is None or not _is_const(weight) or len(weight.const_value.shape) != 2:
        return "int4 needs a MatMul with a 2-D constant weight"
    if weight.const_value.dtype != ir.DataType.FLOAT:
        return "int4 needs a float32 weight"
    if weight.const_value.shape[0] % block:
        return f"int4: reduction axis {weight.const_value.shape[0]} is not a multiple of the block size {block}"
    return None


def dynamic_ineligible(node: ir.Node) -> str | None:
    """Why dynamic int8 cannot serve this node, or None."""
    if node.op_type == "LSTM":
        return _lstm_ineligible(node)
    weight = node.inputs[1] if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
    if weight is None or not _is_const(weight) or len(weight.const_value.shape) != 2:
        return "int8-dynamic needs a MatMul or Gemm with a 2-D constant weight"
    if weight.const_value.dtype != ir.DataType.FLOAT:
        return "int8-dynamic needs a float32 weight"
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return "int8-dynamic: Gemm with transA, alpha or beta"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not _is_const(bias):
            return "int8-dynamic: Gemm bias is not constant"
    return None


def embedding_table(node: ir.Node) -> ir.Value | None:
    """The constant float32 table (rank ≥ 2) a Gather reads by indices computed at run time, or None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    table, indices = node.inputs[0], node.inputs[1]
    if not _is_const(table) or _is_const(indices) or table.const_value.dtype != ir.DataType.FLOAT \
            or len(table.const_value.shape) < 2:
        return None
    return table


def embedding_ineligible(node: ir.Node) -> str | None:
    """Why an embedding table (:func:`embedding_table`) cannot be stored int8, or None."""
    table = embedding_table(node)
    if table is None:
        return "int8 rows need a Gather of a constant float32 table by run-time indices"
    if node.attributes.get_int("axis", 0) not in (0, -len(table.const_value.shape)):
        return "a Gather along another axis than the table's rows"
    if table.const_value.nbytes < EMBEDDING_MIN_BYTES:
        return f"a table under {EMBEDDING_MIN_BYTES / 2**20:g} MiB: int8 saves too little to pay for 3 more kernels"
    return None


def _lstm_ineligible(node: ir.Node) -> str | None:
    weights = node.inputs[1:3]
    if len(weights) < 2 or not all(_is_const(w) and len(w.const_value.shape) == 3 for w in weights):
        return "int8-dynamic needs an LSTM with constant 3-D W and R"
    if node.inputs[0].dtype != ir.DataType.FLOAT or any(w.const_value.dtype != ir.DataType.FLOAT for w in weights):
        return "int8-dynamic needs a float32 LSTM"
    if node.attributes.get_int("layout", 0):
        return "int8-dynamic: a batch-first LSTM (layout 1) has no dynamic int8 kernel"
    return None


def _is_activation(value: ir.Value | None, ranges: dict) -> bool:
    return (value is not None and value.const_value is None and not value.is_initializer()
            and value.dtype == ir.DataType.FLOAT and value.name in ranges)


def _angles(graph: ir.Graph) -> set[ir.Value]:
    """The values of ``graph`` a Sin/Cos reads, directly or through :data:`_ANGLE_CARRIERS`."""
    found: set[ir.Value] = set()
    frontier = [node.inputs[0] for node in graph if node.op_type in PERIODIC_OPS and node.inputs]
    while frontier:
        value = frontier.pop()
        if value is None or value in found:
            continue
        found.add(value)
        made = value.producer()
        if made is not None and made.graph is graph and made.op_type in _ANGLE_CARRIERS:
            frontier += made.inputs if made.op_type == "Concat" else made.inputs[:1]
    return found


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _subgraphs_named(graph: ir.Graph, prefix: str = ""):
    """Every subgraph at any depth, with a prefix naming it by its node and attribute (node names are unique)."""
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                name = f"{prefix}{node.name}_{attr.name}_"
                yield from _subgraphs_named(attr.as_graph(), name)
                yield attr.as_graph(), name


class InsertQDQPass(ir.passes.InPlacePass):
    def __init__(self, rules: QuantizationRules, ranges: dict[str, tuple[float, float]],
                 keep_float: frozenset[str] | set[str] = frozenset(), precisions: dict[str, str] | None = None,
                 int4_block_size: int = 32, unbounded: frozenset[str] | set[str] = frozenset()):
        super().__init__()
        self.rules = rules
        self.ranges = ranges
        self.unbounded = set(unbounded)
        self.keep_float = set(keep_float)
        self.precisions = dict(precisions or {})
        self.int4_block_size = int4_block_size
        self.decisions: dict[str, Decision] = {}
        self.owners: dict[str, str] = {}
        self.subgraph_compute_left_float = 0
        self._weights: dict[str, tuple] = {}  # key → the stored weight's values (a shared weight is stored once)
        self._dynamic_inputs: dict[tuple[ir.Graph, ir.Value], list[ir.Value]] = {}
        self._angles: set[ir.Value] = set()  # of the graph being planned

    # classification -------------------------------------------------------------------------------
    def _role(self, node: ir.Node) -> str | None:
        if node.domain not in ("", "ai.onnx"):
            return None
        r = self.rules
        if node.op_type in r.compute_ops:
            return "compute"
        if node.op_type in r.requant_ops:
            return "requant"
        if node.op_type in r.passthrough_ops:
            return "passthrough"
        return None

    def _activation_inputs(self, node: ir.Node, role: str) -> list[int]:
        if role == "compute":
            if node.op_type in ("MatMul", "Gemm") and not _is_const(node.inputs[1]):
                return [0, 1]
            return [0]
        if role == "requant":
            return list(range(len(node.inputs)))
        return [0]

    def _kept_float(self, node: ir.Node, precisions: tuple[str, ...] = ("float",)) -> str | None:
        """Why an exclusion, a measured choice or the allocation (a precision in ``precisions``) keeps ``node``
        out of this rewrite, or None."""
        if EXCLUDE_KEY in node.meta:
            return node.meta[EXCLUDE_KEY]
        if node.name in self.keep_float:
            return "returned to float by a measured choice: int8 slower here, or the fidelity guard"
        if self.precisions.get(node.name, "int8") in precisions:
            return f"{self.precisions[node.name]} by the mixed-precision allocation"
        return None

    def _ineligible(self, node: ir.Node, role: str) -> str | None:
        """Why this node cannot be quantized, or None."""
        reason = self._kept_float(node, ("float", *OUTSIDE_QDQ))
        if reason is not None:
            return reason
        for i in self._activation_inputs(node, role):
            if not _is_activation(node.inputs[i], self.ranges):
                return f"input {i} is not a float activation with a calibrated range"
        if role == "passthrough" and not all(_is_const(v) for v in node.inputs[1:] if v is not None):
            return "a non-data input is not constant"
        if role != "compute" and any(node.inputs[i].name in self.unbounded
                                     for i in self._activation_inputs(node, role)):
            return "an input held ±inf, NaN or a mask's −3.4e38 on the calibration data: integers keep none of them"
        if any(out in self._angles for out in node.outputs):
            return "its output is an angle a Sin/Cos reads: a periodic function turns its rounding into its whole range"
        if role == "compute":
            if not self.rules.activation_matmuls and len(self._activation_inputs(node, role)) == 2:
                return "MatMul of two activations, left float by the chosen op set"
            if node.op_type in ("Conv", "ConvTranspose") and not _is_const(node.inputs[1]):
                return "weight is not constant"
            if node.op_type == "Gemm":
                if node.attributes.get_int("transA", 0):
                    return "Gemm with transA=1"
                bias = node.inputs[2] if len(node.inputs) > 2 else None
                if bias is not None and not (_is_const(bias) and bias.const_value.numpy().ndim == 1):
                    return "Gemm bias is not a constant vector"
            if node.op_type == "ConvTranspose" and node.attributes.get_int("group", 1) != 1:
                return "grouped ConvTranspose"
        if role != "passthrough":
            out = self._fused_output(node)
            if out.name not in self.ranges:
                return "output has no calibrated range"
        return None

    def _fused_activation(self, node: ir.Node) -> ir.Node | None:
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            return None
        user = uses[0][0]
        if user.op_type not in self.rules.activation_fusions or user.graph is not node.graph:
            return None
        if user.op_type == "Clip" and not all(_is_const(v) for v in user.inputs[1:] if v is not None):
            return None
        return user

    def _fused_output(self, node: ir.Node) -> ir.Value:
        act = self._fused_activation(node)
        return (act or node).outputs[0]

    # the pass -----------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        quantized = False
        for graph, prefix in (*_subgraphs_named(model.graph), (model.graph, "")):  # each graph on its own
            quantized |= self._quantize_graph(graph, prefix)
        if any(d.op_type == "LSTM" and d.precision == DYNAMIC for d in self.decisions.values()):
            model.opset_imports.setdefault(MICROSOFT, 1)
        if any(d.precision in WIDE_OPSET_PRECISIONS for d in self.decisions.values()) and \
                default_opset(model) < WIDE_OPSET:
            raise ValueError(f"int4/int16 Q/DQ needs opset {WIDE_OPSET}; convert the model first")
        self._count_subgraph_compute(model.graph)
        common.TopologicalSortPass()(model)
        common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=quantized)

    def planned(self, model: ir.Model) -> tuple[set[str], set[str]]:
        """The main-graph nodes this pass would quantize and the tensors it would give a Q→DQ pair (names),
        without changing the model: what a candidate build differs from float in."""
        _, kept, tensors = self._plan(model.graph)
        return {n.name for n in kept}, {v.name for v in tensors}

    def _plan(self, graph: ir.Graph) -> tuple[dict, set, dict[ir.Value, str]]:
        """Roles, the nodes kept after growth, and the tensors to quantize (each with its owner) of one graph;
        the nodes left float get their decisions."""
        roles, eligible = {}, set()
        self._angles = _angles(graph)
        for node in graph:
            role = self._role(node)
            if role is None:
                continue
            roles[node] = role
            reason = self._ineligible(node, role)
            if reason is None:
                eligible.add(node)
            else:
                self.decisions[node.name] = Decision(node.op_type, False, reason)
        kept = self._grow(graph, roles, eligible)
        for node in eligible - kept:
            self.decisions[node.name] = Decision(node.op_type, False, "no integer neighbour: would be a Q/DQ island")
        return roles, kept, self._quantized_tensors(graph, roles, kept)

    def _quantize_graph(self, graph: ir.Graph, prefix: str) -> bool:
        """Quantize the nodes of one graph (not of its subgraphs); names of new weights get ``prefix``."""
        self._graph, self._prefix = graph, prefix
        self._fold_transposed_weights(graph)
        roles, kept, tensors = self._plan(graph)
        qparams = self._resolve_qparams(graph, roles, kept, tensors)
        for node in list(graph):
            if node in kept and roles[node] == "compute":
                self._quantize_weights(graph, node, qparams)
        for value, owner in tensors.items():
            self._insert_pair(graph, value, qparams[value], owner)
        for node in list(graph):
            if node not in kept:
                self._keep_weight_float(graph, node)
        for node in kept:
            wide = self.precisions.get(node.name) == "int16" and roles[node] == "compute"
            self.decisions[node.name] = Decision(node.op_type, True, roles[node], "int16" if wide else "int8")
            act = self._fused_activation(node) if roles[node] != "passthrough" else None
            if act is not None:
                self.owners[act.name] = node.name
        rewritten = [(n.name, n) for n in graph
                       if self.precisions.get(n.name) in OUTSIDE_QDQ and EXCLUDE_KEY not in n.meta
                       and n.name not in self.keep_float]
        rewrite = {"int4": self._quantize_int4, "fp16": self._store_fp16, DYNAMIC: self._quantize_dynamic}
        for name, node in rewritten:
            rewrite[self.precisions[name]](graph, node)
        gathers_integers = "Gather" in self.rules.passthrough_ops
        embeddings = [n for n in graph if gathers_integers and embedding_table(n) is not None]
        for node in embeddings:
            self._quantize_embedding(graph, node)
        rewrote = [name for name, _ in rewritten] + [node.name for node in embeddings]
        return bool(kept) or any(self.decisions[name].quantized for name in rewrote)

    def _fold_transposed_weights(self, graph: ir.Graph) -> None:
        """MatMul/Gemm(x, Transpose(constant)) → MatMul/Gemm(x, the constant transposed), each fold stored once."""
        folded: dict[ir.Node, ir.Value] = {}
        for node in list(graph):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 \
                    or self._kept_float(node) is not None:
                continue
            made = node.inputs[1].producer() if node.inputs[1] is not None else None
            if made is None or made.op_type != "Transpose" or made.domain not in ("", "ai.onnx") \
                    or made.graph is not graph or not _is_const(made.inputs[0]):
                continue
            source = made.inputs[0].const_value
            if source.dtype != ir.DataType.FLOAT or len(source.shape) != 2:
                continue
            if made not in folded:
                array = np.ascontiguousarray(source.numpy().transpose(made.attributes.get_ints("perm", [1, 0])))
                folded[made] = self._initializer(graph, f"{self._prefix}{made.outputs[0].name}_folded", array)
            node.replace_input_with(1, folded[made])

    def _grow(self, graph: ir.Graph, roles: dict, eligible: set) -> set:
        kept = {n for n in eligible if roles[n] == "compute"}
        frontier = list(kept)
        while frontier:
            node = frontier.pop()
            for other in self._neighbours(node):
                if other in eligible and other not in kept and other.graph is graph:
                    kept.add(other)
                    frontier.append(other)
        return kept

    def _neighbours(self, node: ir.Node):
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                producer = value.producer()
                # look through a fused activation to the node that owns it
                if producer.op_type in self.rules.activation_fusions and producer.inputs and \
                        producer.inputs[0] is not None and producer.inputs[0].producer() is not None:
                    yield producer.inputs[0].producer()
                yield producer
        for out in (self._fused_output(node), *node.outputs):
            for user, _ in out.uses():
                yield user

    def _quantized_tensors(self, graph: ir.Graph, roles: dict, kept: set) -> dict[ir.Value, str]:
        """Each tensor to get a Q→DQ pair, with the node it is inserted for, in graph order."""
        tensors: dict[ir.Value, str] = {}
        for node in graph:
            if node not in kept:
                continue
            for i in self._activation_inputs(node, roles[node]):
                tensors.setdefault(node.inputs[i], node.name)
            tensors.setdefault(self._fused_output(node) if roles[node] != "passthrough" else node.outputs[0],
                               node.name)
        return tensors

    def _resolve_qparams(self, graph, roles, kept, tensors) -> dict[ir.Value, QParams]:
        """Per tensor: 16-bit when an int16 (W8A16) compute node reads or writes it, else 8-bit; a passthrough
        op's output takes its input's parameters."""
        wide = {v for n in kept if roles[n] == "compute" and self.precisions.get(n.name) == "int16"
                for v in (*(n.inputs[i] for i in self._activation_inputs(n, "compute")), self._fused_output(n))}
        params: dict[ir.Value, QParams] = {}
        for node in graph:  # topological order: a passthrough's input is resolved before its output
            for value in (*node.inputs, *node.outputs):
                if value in tensors and value not in params:
                    producer = value.producer()
                    if producer in kept and roles.get(producer) == "passthrough" and producer.inputs[0] in params:
                        params[value] = params[producer.inputs[0]]
                    else:
                        dtype = WIDE[self.rules.activations] if value in wide else self.rules.activations
                        params[value] = activation_qparams(*self.ranges[value.name], dtype,
                                                           self.rules.symmetric_activations)
        return params

    def _count_subgraph_compute(self, graph: ir.Graph) -> None:
        """Count compute nodes in subgraphs (any depth) that stayed float; note why for those not judged."""
        for node in graph:
            if node.op_type not in _SUBGRAPH_OPS:
                continue
            for attr in node.attributes.values():
                subgraphs = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
                for sub in (g for g in subgraphs if isinstance(g, ir.Graph)):
                    for inner in ir.traversal.RecursiveGraphIterator(sub):
                        if inner.op_type not in self.rules.compute_ops:
                            continue
                        decided = self.decisions.get(inner.name)
                        if decided is None:
                            self.decisions[inner.name] = Decision(
                                inner.op_type, False, f"inside a {node.op_type} subgraph (not quantized)")
                        if not self.decisions[inner.name].quantized:
                            self.subgraph_compute_left_float += 1

    # rewriting ----------------------------------------------------------------------------------------
    def _initializer(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        if name in graph.initializers:
            return graph.initializers[name]
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    def _dequantize(self, graph, owner, q: ir.Value, scale: ir.Value, zero: ir.Value, axis: int | None,
                    name: str) -> ir.Value:
        attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
        node = ir.Node("", "DequantizeLinear", [q, scale, zero], attributes=attrs, name=f"{name}_DequantizeLinear",
                       num_outputs=1)
        node.outputs[0].name = f"{name}_dequantized"
        node.outputs[0].dtype = ir.DataType.FLOAT
        graph.append(node)
        self.owners[node.name] = owner
        return node.outputs[0]

    def _weight_axis(self, node: ir.Node, rank: int) -> int | None:
        return weight_channel_axis(node, rank) if self.rules.per_channel else None

    def _quantize_weights(self, graph: ir.Graph, node: ir.Node, qparams: dict) -> None:
        weight = node.inputs[1]
        if not _is_const(weight):
            return
        axis = self._weight_axis(node, len(weight.const_value.shape))
        key = f"{self._prefix}{weight.name}" + ("" if axis is None else f"_axis{axis}")
        if key not in self._weights:  # a shared weight is quantized once
            q, scale = weight_quantize(weight.const_value.numpy().astype(np.float32), axis, self.rules.reduce_range)
            qv = self._initializer(graph, f"{key}_quantized", q)
            qv.const_value.metadata_props.update(weight.const_value.metadata_props)  # e.g. a 2:4 annotation
            sv = self._initializer(graph, f"{key}_scale", scale if axis is not None else scale.reshape(()))
            zv = self._initializer(graph, f"{key}_zero_point", np.zeros_like(q, shape=scale.shape))
            self._weights[key] = (self._dequantize(graph, node.name, qv, sv, zv, axis, key), scale)
        dq, scale = self._weights[key]
        node.replace_input_with(1, dq)

        bias_index = 2
        bias = node.inputs[bias_index] if len(node.inputs) > bias_index else None
        if _is_const(bias) and node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            s_in = qparams[node.inputs[0]].scale
            b = bias.const_value.numpy().astype(np.float64)
            s_b = (np.float64(s_in) * scale.astype(np.float64)) * np.ones_like(b)
            bq = np.clip(np.round(b / s_b), -(2**31), 2**31 - 1).astype(np.int32)
            name = f"{node.name}_bias"
            bqv = self._initializer(graph, f"{name}_quantized", bq)
            bsv = self._initializer(graph, f"{name}_scale", s_b.astype(np.float32))
            bzv = self._initializer(graph, f"{name}_zero_point", np.zeros_like(bq))
            node.replace_input_with(bias_index, self._dequantize(graph, node.name, bqv, bsv, bzv, 0, name))

    def _keep_weight_float(self, graph: ir.Graph, node: ir.Node) -> None:
        """A float Conv/ConvTranspose/Gemm with a constant weight that reads a per-tensor dequantized
        activation reads it through a DequantizeLinear of its own, the scale repeated per channel (axis 1):
        ONNX Runtime gives such a node's float weight per-tensor int8 (its WeightBiasQuantization
        transformer), which would quantize a node the build keeps float."""
        dq = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if (node.op_type not in _WEIGHT_QUANTIZED_BY_ORT or node.domain not in ("", "ai.onnx") or dq is None
                or dq.name not in self.owners or dq.op_type != "DequantizeLinear" or len(node.inputs) < 2
                or not _is_const(node.inputs[1]) or constant_dequantize(dq.outputs[0]) is not None):
            return
        shape = node.inputs[1].const_value.shape
        if node.op_type == "Conv":
            channels = shape[1] * node.attributes.get_int("group", 1)
        elif node.op_type == "ConvTranspose":
            channels = shape[0]
        elif not node.attributes.get_int("transA", 0):
            channels = shape[1] if node.attributes.get_int("transB", 0) else shape[0]
        else:
            channels = node.inputs[0].shape[1] if node.inputs[0].shape is not None else None
        if not isinstance(channels, int):
            return
        quantized, scale, zero = dq.inputs
        name = f"{node.name}_input"
        scales = self._initializer(graph, f"{name}_scale", np.full(channels, scale.const_value.numpy(), np.float32))
        zeros = self._initializer(graph, f"{name}_zero_point", np.full(channels, zero.const_value.numpy()))
        node.replace_input_with(0, self._dequantize(graph, node.name, quantized, scales, zeros, 1, name))

    def _quantize_int4(self, graph: ir.Graph, node: ir.Node) -> None:
        reason = int4_ineligible(node, self.int4_block_size)
        if reason is not None:
            self.decisions[node.name] = Decision(node.op_type, False, reason)
            return
        weight, block = node.inputs[1], self.int4_block_size
        key = f"{self._prefix}{weight.name}_int4"
        if key not in self._weights:
            q, scale, zero = int4_blockwise(weight.const_value.numpy(), block)
            qv = self._initializer4(graph, f"{key}_quantized", q)
            sv = self._initializer(graph, f"{key}_scale", scale)
            zv = self._initializer4(graph, f"{key}_zero_point", zero)
            attrs = [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", block)]
            dq = self._append(graph, node.name, "DequantizeLinear", [qv, sv, zv], f"{key}_dequantized", attrs,
                              ir.DataType.FLOAT)
            self._weights[key] = (dq[0], scale)
        node.replace_input_with(1, self._weights[key][0])
        self.decisions[node.name] = Decision(node.op_type, True, f"int4 weight-only, blocks of {block}", "int4")

    def _store_fp16(self, graph: ir.Graph, node: ir.Node) -> None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not _is_const(weight) or weight.const_value.dtype != ir.DataType.FLOAT:
            self.decisions[node.name] = Decision(node.op_type, False, "fp16 needs a constant float32 weight")
            return
        key = f"{self._prefix}{weight.name}_fp16"
        if key not in self._weights:
            half = self._initializer(graph, key, weight.const_value.numpy().astype(np.float16))
            attrs = [ir.AttrInt64("to", ir.DataType.FLOAT)]
            self._weights[key] = (self._append(graph, node.name, "Cast", [half], f"{key}_as_float", attrs,
                                               ir.DataType.FLOAT)[0], None)
        node.replace_input_with(1, self._weights[key][0])
        self.decisions[node.name] = Decision(node.op_type, True, "fp16 weights (Cast to float before use)", "fp16")

    def _quantize_dynamic(self, graph: ir.Graph, node: ir.Node) -> None:
        reason = dynamic_ineligible(node)
        if reason is not None:
            self.decisions[node.name] = Decision(node.op_type, False, reason)
            return
        if node.op_type == "LSTM":
            return self._quantize_lstm(graph, node)
        weight, name = node.inputs[1], node.name
        axis = 1 if self.rules.per_channel else None
        key = f"{self._prefix}{weight.name}_dynamic"
        if key not in self._weights:
            array = weight.const_value.numpy().astype(np.float32)
            if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
                array = array.T
            q, scale = weight_quantize(array, axis, self.rules.reduce_range)
            scale = scale if axis is not None else scale.reshape(())
            self._weights[key] = (self._initializer(graph, f"{key}_quantized", q),
                                  self._initializer(graph, f"{key}_scale", scale),
                                  self._initializer(graph, f"{key}_zero_point", np.zeros(scale.shape, np.int8)))
        wq, ws, wz = self._weights[key]
        x = node.inputs[0]
        if (graph, x) not in self._dynamic_inputs:  # one run-time quantization per activation
            made = self._append(graph, name, "DynamicQuantizeLinear", [x], f"{self._prefix}{x.name}_dynamic",
                                outputs=3)
            self._dynamic_inputs[(graph, x)] = made
            made[0].dtype, made[1].dtype, made[2].dtype = ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8
        xq, xs, xz = self._dynamic_inputs[(graph, x)]
        scale = self._append(graph, name, "Mul", [xs, ws], f"{name}_dynamic_scale", dtype=ir.DataType.FLOAT)[0]
        result = self._append(graph, name, "MatMulInteger", [xq, wq, xz, wz], f"{name}_dynamic_int32",
                              dtype=ir.DataType.INT32)[0]
        result = self._append(graph, name, "Cast", [result], f"{name}_dynamic_float",
                              [ir.AttrInt64("to", ir.DataType.FLOAT)], ir.DataType.FLOAT)[0]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        result = self._append(graph, name, "Mul", [result, scale], f"{name}_dynamic_scaled", dtype=ir.DataType.FLOAT)[0]
        if bias is not None:
            result = self._append(graph, name, "Add", [result, bias], f"{name}_dynamic_biased", dtype=ir.DataType.FLOAT)[0]
        self._replace(graph, node, [result], Decision(node.op_type, True, "compute", DYNAMIC))

    def _quantize_embedding(self, graph: ir.Graph, node: ir.Node) -> None:
        """Gather(table, ids) → Cast(Gather(int8 rows, ids)) · Gather(row scales, ids)."""
        reason = embedding_ineligible(node) or self._kept_float(node)
        if reason is not None:
            self.decisions[node.name] = Decision(node.op_type, False, reason)
            return
        table, ids = node.inputs[0], node.inputs[1]
        key = f"{self._prefix}{table.name}_rows"
        if key not in self._weights:
            array = table.const_value.numpy()
            q, scale = np.empty(array.shape, np.int8), np.empty(array.shape[0], np.float32)
            for start in range(0, array.shape[0], _ROWS_AT_ONCE):  # a table of GBs: its temporaries bounded
                block = slice(start, start + _ROWS_AT_ONCE)
                q[block], scale[block] = weight_quantize(array[block], 0, reduce_range=False)  # stored, not multiplied
            scale = scale.reshape((-1,) + (1,) * (array.ndim - 1))
            self._weights[key] = (self._initializer(graph, f"{key}_quantized", q),
                                  self._initializer(graph, f"{key}_scale", scale))
        rows, scales = self._weights[key]
        name = node.name
        axis = [ir.AttrInt64("axis", 0)]
        gathered = self._append(graph, name, "Gather", [rows, ids], f"{name}_int8_rows", axis, ir.DataType.INT8)[0]
        as_float = self._append(graph, name, "Cast", [gathered], f"{name}_rows_float",
                                [ir.AttrInt64("to", ir.DataType.FLOAT)], ir.DataType.FLOAT)[0]
        row_scales = self._append(graph, name, "Gather", [scales, ids], f"{name}_row_scales", axis,
                                  ir.DataType.FLOAT)[0]
        result = self._append(graph, name, "Mul", [as_float, row_scales], f"{name}_dequantized",
                              dtype=ir.DataType.FLOAT)[0]
        self._replace(graph, node, [result], Decision(node.op_type, True, EMBEDDING, "int8"))

    def _quantize_lstm(self, graph: ir.Graph, node: ir.Node) -> None:
        """LSTM → DynamicQuantizeLSTM: int8 W and R transposed to [directions, input or hidden, 4·hidden]."""
        quantized = []
        for weight in node.inputs[1:3]:
            key = f"{self._prefix}{weight.name}_dynamic_lstm"
            if key not in self._weights:
                array = weight.const_value.numpy().astype(np.float32)
                directions, rows = array.shape[:2]
                if self.rules.per_channel:  # one scale per gate row of each direction
                    q, scale = weight_quantize(array.reshape(directions * rows, -1), 0, self.rules.reduce_range)
                    scale = scale.reshape(directions, rows)
                else:
                    q, scale = weight_quantize(array.reshape(directions, -1), 0, self.rules.reduce_range)
                q = q.reshape(array.shape).transpose(0, 2, 1)
                self._weights[key] = (self._initializer(graph, f"{key}_quantized", np.ascontiguousarray(q)),
                                      self._initializer(graph, f"{key}_scale", scale),
                                      self._initializer(graph, f"{key}_zero_point", np.zeros(scale.shape, np.int8)))
            quantized.append(self._weights[key])
        (wq, ws, wz), (rq, rs, rz) = quantized
        inputs = [node.inputs[0], wq, rq, *node.inputs[3:8], *[None] * (8 - max(3, len(node.inputs))), ws, wz, rs, rz]
        attributes = [a for a in node.attributes.values() if a.name != "layout"]
        lstm = ir.Node(MICROSOFT, "DynamicQuantizeLSTM", inputs, attributes=attributes, name=node.name,
                       num_outputs=len(node.outputs))
        for made in lstm.outputs:
            made.dtype = ir.DataType.FLOAT
        graph.insert_before(node, lstm)
        self._replace(graph, node, list(lstm.outputs), Decision(node.op_type, True, "compute", DYNAMIC))

    def _replace(self, graph: ir.Graph, node: ir.Node, results: list[ir.Value], decision: Decision) -> None:
        """``node``'s outputs become ``results`` under the same names; the node goes, with ``decision``."""
        for out, result in zip(node.outputs, results):
            original, result.shape = out.name, out.shape
            out.name = f"{original}_float"
            result.name = original  # graph outputs keep their names, and ranges their tensors
            out.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        self.decisions[node.name] = decision

    def _append(self, graph: ir.Graph, owner: str, op_type: str, inputs: list, name: str, attributes=(),
                dtype: ir.DataType | None = None, outputs: int = 1) -> list[ir.Value]:
        """Append a node serving ``owner`` whose output is named ``name`` (three outputs: name_quantized,
        name_scale, name_zero_point, as DynamicQuantizeLinear makes)."""
        made = ir.Node("", op_type, inputs, attributes=list(attributes), name=f"{name}_{op_type}",
                       num_outputs=outputs)
        for index, value in enumerate(made.outputs):
            value.name = name if outputs == 1 else f"{name}_{('quantized', 'scale', 'zero_point')[index]}"
            if dtype is not None:
                value.dtype = dtype
        graph.append(made)
        self.owners[made.name] = owner
        return list(made.outputs)

    def _initializer4(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.Tensor(array, dtype=ir.DataType.UINT4, name=name))
        graph.register_initializer(value)
        return value

    def _insert_pair(self, graph: ir.Graph, value: ir.Value, params: QParams, owner: str) -> None:
        base = self._prefix + value.name  # a branch may quantize a value the main graph quantizes too
        dtype = _NP_TYPES[params.dtype]
        scale = self._initializer(graph, f"{base}_scale", np.array(params.scale, dtype=np.float32))
        zero = self._initializer(graph, f"{base}_zero_point", np.array(params.zero_point, dtype=dtype))
        qnode = ir.Node("", "QuantizeLinear", [value, scale, zero], name=f"{base}_QuantizeLinear", num_outputs=1)
        qnode.outputs[0].name = f"{base}_quantized"
        graph.append(qnode)
        self.owners[qnode.name] = owner
        users = [(u, i) for u, i in value.uses() if u is not qnode and u.graph is graph]
        dq = self._dequantize(graph, owner, qnode.outputs[0], scale, zero, None, base)
        dq.shape = value.shape
        for user, index in users:
            user.replace_input_with(index, dq)
        # the graph's output keeps its name; an input passed through as an output stays exact, under its name
        if value in list(graph.outputs) and not value.is_graph_input():
            position = list(graph.outputs).index(value)
            original = value.name
            value.name = f"{base}_float"
            dq.name = original
            graph.outputs[position] = dq
