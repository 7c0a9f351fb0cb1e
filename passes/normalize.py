"""Normalize a float model into the form the later passes expect.

Rules, in order:
1. A model that already holds quantization ops (QuantizeLinear, QLinear*, *Integer, …) is refused: quantizing
   twice only loses accuracy. The user must pass the float original. So is a model exported in training mode
   (a BatchNormalization with ``training_mode=1`` or its running statistics as outputs, a Dropout whose
   ``training_mode`` is a constant true): its outputs depend on the batch and on chance, so no build can be
   judged against it, and the user meant the model in inference mode.
2. The default-domain opset is raised to at least 14 (per-channel DequantizeLinear needs ``axis``, 13; the
   HardSwish of rule 4, 14), by
   :mod:`edgeq.passes.convert_opset` (never by relabelling); a model that computes in float16 computes in
   float32 behind its float16 inputs and outputs (:mod:`edgeq.passes.float16_to_float32`). Before anything,
   nodes listed out of order are sorted (an old TensorFlow converter lists consumers before producers; ONNX
   Runtime sorts them itself, onnx's shape inference types nothing after the first), and the shapes an
   exporter declared for the values nodes make are dropped and inferred again: they are claims,
   not facts (jax2onnx declared channels-last shapes on channels-first values, and the optimizer then padded
   a ``SAME`` Conv for the wrong width); the main graph's inputs and outputs keep theirs. After the conversion,
   ONNX Runtime's own fusions (``FusedConv``, ``FusedGemm``, ``FusedMatMul`` in a model saved from an optimized
   session) become ONNX ops again (:mod:`edgeq.passes.unfuse_runtime_ops`).
3. Weights become constants. Where an exporter listed every initializer as a graph input too (IR 3, torch
   before 1.4, old converters), they are inputs no more: ONNX Runtime treats such a weight as one a caller may
   override, so it folds no BatchNorm into it and prepacks nothing (a CenterFace face detector: 19.0 →
   2.3 ms), and the optimizer below folds nothing through it; callers never feed weights. A model that lists
   only some initializers as inputs (inputs with defaults: a threshold, an initial state) keeps them.
   ``Constant`` nodes holding tensors become initializers, so weights stored that way (legacy exporters,
   converters) get per-channel scales like any other weight — in subgraphs too. A value a Loop carries
   unchanged from a constant start is read by its body as that constant (:mod:`edgeq.passes.loop_constants`:
   tf2onnx carries a TensorFlow RNN's kernels so) unless ``loop_constants`` is off: ONNX Runtime then runs
   the body's MatMuls with prepacked weights, which round differently (an autoregressive table decoder's
   tokens changed), and :func:`edgeq.model_check.normalize_checked` normalizes again without it where that
   shows. A Conv/ConvTranspose/Gemm/
   MatMul weight or bias, or an LSTM/GRU/RNN's W, R or B, that nodes compute from constants (torch's
   weight_norm exported without constant folding; a scripted LSTM reordering torch's gates at run time) is
   folded into a constant, whatever its size — unless that copies a large constant another node
   still reads (a tied embedding table).
4. onnxscript's optimizer (its default passes and rules, less one that is quadratic in graph size, plus its
   HardSwish/HardSigmoid fusions unless ``fuse_activations`` is off) folds constants, fuses BatchNorm into
   Conv/Gemm — and BatchNorm written as arithmetic, per-channel Sub/Mul/Div/Add after a Conv, into the Conv
   (:mod:`edgeq.passes.fold_conv_affine`) —, decomposed HardSwish (``x·Clip(x+3, 0, 6)/6``,
   ``x·HardSigmoid(x)``) and HardSigmoid into the ops (the same function, rounded differently:
   :func:`edgeq.model_check.normalize_checked` normalizes again without them, and without rule 5, where that
   difference shows), removes no-op and Identity nodes
   (where that is safe) and dead code; onnx_ir's shape inference then types every intermediate value
   (:mod:`edgeq.passes.infer_shapes`: a sequence stays a sequence).
5. ``ReduceMean`` over the two spatial axes of a 4-D tensor becomes ``GlobalAveragePool`` (followed by a
   ``Flatten`` when ``keepdims=0``) unless ``pool_means`` is off: the same mean, summed in another
   order, but an op with an integer kernel that follows ONNX Runtime's channels-last layout (a ReduceMean there
   costs several times more than in the float model).
6. Every node and value gets a unique name (exporters leave names empty; decisions and ranges are keyed by
   name), and every subgraph output is made by a node of its own graph: an output that is an outer-scope
   value, an initializer, an input or another output gets an ``Identity``. (ONNX Runtime refuses a subgraph
   that returns an outer-scope value directly, and the optimizer removes the Identity exporters put there.)
   Main-graph inputs and outputs keep their names.
7. Before rule 4 folds a BatchNorm into its Gemm, the main graph's outputs that a normalization makes
   (LayerNormalization, RMSNormalization, BatchNormalization and ONNX Runtime's fused forms, through reshapes
   and casts: an encoder's hidden state, a face embedding's last BatchNorm) are recorded in the model's
   metadata (``FEATURES_KEY``, a JSON list): the fidelity guard reads them as features, not as logits.
8. After rule 4, where the caller gives a ``transpose_optimizer`` (:func:`edgeq.runtimes.onnxruntime.
   transposes_optimized`; a pass runs no session itself), the Transposes a channels-last port wraps around each
   Conv cancel (:mod:`edgeq.passes.cancel_transposes`) and rule 4 runs again, folding what they held apart.

Deterministic: the same input model gives the same output model.
"""

from __future__ import annotations

import json
import sys

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import fuse_hardswish_rules

from edgeq.errors import UserError
from edgeq.passes import fold_conv_affine
from edgeq.passes.cancel_transposes import CancelTransposesPass, TransposeOptimizer
from edgeq.passes.convert_opset import ConvertOpsetPass, default_opset
from edgeq.passes.float16_to_float32 import Float16ToFloat32Pass
from edgeq.passes.infer_shapes import InferShapesPass
from edgeq.passes.loop_constants import LoopConstantsPass
from edgeq.passes.unfuse_runtime_ops import UnfuseRuntimeOpsPass

MIN_OPSET = 14
FEATURES_KEY = "edgeq.feature_outputs"
NORMALIZATIONS = ("LayerNormalization", "RMSNormalization", "BatchNormalization", "SimplifiedLayerNormalization",
                  "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
_SHAPE_ONLY = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast")
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "DynamicQuantizeMatMul",
    "MatMulNBits", "MatMulIntegerToFloat", "QLinearConcat", "QLinearSigmoid", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeLSTM",
})


def quantized_ops_in(model: ir.Model) -> list[str]:
    """The quantization op types present anywhere in the model (subgraphs included)."""
    return sorted({node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
                   if node.op_type in QUANTIZED_OPS})


def training_mode_nodes(model: ir.Model) -> list[str]:
    """What computes as in training, counted: BatchNormalizations normalizing with the batch's statistics
    (``training_mode=1``, or their running statistics as outputs — opsets before 14), Dropouts whose
    ``training_mode`` input is a constant true."""
    batch_norms = dropouts = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            batch_norms += bool(node.attributes.get_int("training_mode", 0)) or any(
                out.name for out in node.outputs[1:])
        elif node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and len(node.inputs) > 2 \
                and node.inputs[2] is not None:
            flag = ir.convenience.get_const_tensor(node.inputs[2])
            dropouts += flag is not None and bool(flag.numpy().any())
    return [f"{count} {op}" for count, op in ((batch_norms, "BatchNormalization"), (dropouts, "Dropout")) if count]


class NormalizePass(ir.passes.InPlacePass):
    """Upgrade opset, compute in float32, make weights constants, fold, fuse BatchNorm [and activations], drop
    Identity, infer shapes [and pool spatial means]. Counts of what changed: ``loop_constants`` (values a Loop
    carried unchanged, read as constants), ``runtime_ops_unfused`` (ONNX
    Runtime fusions made ONNX ops), ``float16_converted`` (float16 tensors and ops made float32),
    ``weights_in_inputs`` (initializers that were graph inputs too),
    ``weights_folded`` (weights computed from constants), ``activations_fused`` (HardSwish/HardSigmoid nodes
    the fusions made), ``means_pooled`` (spatial ReduceMeans made GlobalAveragePool), ``transposes_cancelled``
    (channels-last Transposes around Convs)."""

    def __init__(self, fuse_activations: bool = True, pool_means: bool = True, loop_constants: bool = True,
                 transpose_optimizer: TransposeOptimizer | None = None):
        super().__init__()
        self.transpose_optimizer = transpose_optimizer
        self.fuse_activations, self.pool_means, self.read_loop_constants = fuse_activations, pool_means, loop_constants
        self.float16_converted = self.activations_fused = self.means_pooled = self.loop_constants = 0
        self.weights_in_inputs = self.weights_folded = self.transposes_cancelled = 0

    @staticmethod
    def refuse_quantized(model: ir.Model) -> None:
        found = quantized_ops_in(model)
        if found:
            raise UserError(f"the model is already quantized (it contains {', '.join(found[:4])})",
                            "pass the float model that it was made from")

    @staticmethod
    def refuse_training_mode(model: ir.Model) -> None:
        found = training_mode_nodes(model)
        if found:
            raise UserError(f"the model was exported in training mode ({', '.join(found)}): its outputs depend on "
                            "the batch and on chance", "re-export it in inference mode (torch: model.eval() before "
                            "torch.onnx.export, and no training=TrainingMode.TRAINING)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.refuse_quantized(model)
        self.refuse_training_mode(model)
        common.TopologicalSortPass()(model)  # ONNX Runtime runs nodes listed out of order; shape inference does not
        _record_feature_outputs(model)
        _infer_declared_shapes_again(model)
        if default_opset(model) < MIN_OPSET:
            ConvertOpsetPass(MIN_OPSET)(model)
        unfuse = UnfuseRuntimeOpsPass()  # after the conversion: it writes opset-14 forms (Clip's bounds as inputs)
        unfuse(model)
        self.runtime_ops_unfused = sum(unfuse.unfused.values())
        full = Float16ToFloat32Pass()
        full(model)
        self.float16_converted = full.converted
        self.weights_in_inputs = _weights_out_of_inputs(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
        if self.read_loop_constants:
            loops = LoopConstantsPass()
            loops(model)
            self.loop_constants = loops.hoisted
        computed = _computed_weights(model)
        _fold_weights(model)
        self.weights_folded = computed - _computed_weights(model)
        input_names = [v.name for v in model.graph.inputs]
        present = _nodes(model, FUSED_OPS)  # kept alive: their ids tell them from the nodes the fusions make
        rules = _REWRITE_RULES + (ACTIVATION_FUSIONS if self.fuse_activations else ())
        _optimize(model, rules)
        if self.transpose_optimizer is not None:
            transposes = CancelTransposesPass(self.transpose_optimizer)
            transposes(model)
            self.transposes_cancelled = transposes.cancelled
            if transposes.cancelled:  # what they held apart from each Conv folds now
                _optimize(model, rules)
        _restore_input_names(model.graph, input_names)
        # Before any pass that counts only node uses: a node whose output a subgraph returns directly has no
        # node use and would be removed as dead. (onnx_ir's IdentityEliminationPass is not run for the same
        # reason: it folds a branch's Identity of an outer value into that value; the optimizer above removes
        # the Identity nodes it can remove safely.)
        for graph in list(model.graph.subgraphs()):
            _own_outputs(graph)
        InferShapesPass()(model)
        if self.pool_means:
            self.means_pooled = _spatial_means_to_global_pool(model.graph)
        ir.passes.PassManager([
            common.RemoveUnusedNodesPass(),
            InferShapesPass(),
            common.TopologicalSortPass(),
            common.NameFixPass(),
        ])(model)
        self.activations_fused = len({id(n) for n in _nodes(model, FUSED_OPS)} - {id(n) for n in present})
        return ir.passes.PassResult(model, modified=True)


def _infer_declared_shapes_again(model: ir.Model) -> None:
    """Rule 2's shapes: every value a node makes, but the main graph's outputs, loses its declared shape, and
    shape inference derives it from the inputs."""
    outputs = set(model.graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    InferShapesPass()(model)


def _nodes(model: ir.Model, op_types: tuple[str, ...]) -> list[ir.Node]:
    return [node for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type in op_types]


# Inputs where the quantizer needs a constant to see a weight (and ONNX Runtime to prepack it).
WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3)}
_REACH = 64  # values followed from a node towards a weight slot


def _is_weight_slot(node: ir.Node, index: int) -> bool:
    return node.domain == "" and index in WEIGHT_SLOTS.get(node.op_type, ())


def _weight_values(nodes) -> list[ir.Value]:
    """The values that fill the weight slots of ``nodes``."""
    return [value for node in nodes for index, value in enumerate(node.inputs)
            if value is not None and _is_weight_slot(node, index)]


def _weights_out_of_inputs(model: ir.Model) -> int:
    """Rule 3's inputs: where every initializer of the main graph is also a graph input and weights are among
    them (an exporter that listed them all), they leave the inputs; a model that lists only some initializers
    as inputs means them as inputs with defaults, and keeps them. Returns how many left."""
    graph = model.graph
    listed = [value for value in graph.inputs if value.is_initializer()]
    if not listed or len(listed) < len(graph.initializers) or not set(_weight_values(graph)).intersection(listed):
        return 0
    common.RemoveInitializersFromInputsPass()(model)
    return len(listed)


def _record_feature_outputs(model: ir.Model) -> None:
    """Rule 7."""
    made = []
    for output in model.graph.outputs:
        node = output.producer()
        while node is not None and node.op_type in _SHAPE_ONLY and node.inputs and node.inputs[0] is not None:
            node = node.inputs[0].producer()
        if node is not None and node.op_type in NORMALIZATIONS:
            made.append(output.name)
    if made:
        model.metadata_props[FEATURES_KEY] = json.dumps(made)
    else:  # a record the model came with (a float artifact compiled again) is this pass's own, or stale
        model.metadata_props.pop(FEATURES_KEY, None)


def _computed_weights(model: ir.Model) -> int:
    """Weight slots filled by a value that a node computes."""
    return sum(1 for value in _weight_values(ir.traversal.RecursiveGraphIterator(model.graph))
               if value.const_value is None and value.producer() is not None)


def _folds_into_weight(node: ir.Node) -> bool:
    """Whether ``node``'s result flows into a weight slot, and folding it copies no large constant that another
    computation still reads (a tied embedding's Transpose feeding the output layer, its Gather keeping the
    original: the folder's own size rule then decides)."""
    if not _reaches_weight_slot(node):
        return False
    limit = onnxscript.optimizer.constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
    for value in node.inputs:
        if value is None or value.const_value is None or value.const_value.size <= limit:
            continue
        if any(user is not node and not (_of_constants(user) and _reaches_weight_slot(user))
               for user, _ in value.uses()):
            return False
    return True


def _of_constants(node: ir.Node) -> bool:
    """Every input of ``node`` is a constant or made from constants by one node."""
    def made_of_constants(value: ir.Value) -> bool:
        producer = value.producer()
        return producer is not None and all(v is None or v.const_value is not None for v in producer.inputs)
    return all(v is None or v.const_value is not None or made_of_constants(v) for v in node.inputs)


def _reaches_weight_slot(node: ir.Node) -> bool:
    """Whether ``node``'s result flows into a weight slot."""
    pending, followed = list(node.outputs), 0
    while pending and followed < _REACH:
        value = pending.pop()
        followed += 1
        for user, index in value.uses():
            if _is_weight_slot(user, index):
                return True
            pending.extend(user.outputs)
    return False


def _fold_weights(model: ir.Model) -> None:
    """Fold the nodes of constants that compute a weight, whatever their size: onnxscript's folder (rule 4)
    leaves a node with an input over 8,192 elements, so torch's weight_norm exported without constant folding
    (``g·v/‖v‖`` at run time) kept its convolutions' weights computed, and those convolutions float."""
    onnxscript.optimizer.constant_folding.FoldConstantsPass(
        shape_inference=False, input_size_limit=sys.maxsize, output_size_limit=sys.maxsize,
        should_fold=_folds_into_weight)(model)


# onnxscript's default rules less those whose pattern has several output nodes (SlicesSplit): its matcher tries
# those against every node of the graph for every candidate, quadratic in graph size — 115 of 127 s on a
# 6,400-node transformer, for a rewrite (two Slices → Split) that changes no number and fired on no corpus model.
# Its no-op rules (x + 0, x − 0, x · 1, x / 1) are replaced by exact ones: its patterns match a constant within
# 1e-8 absolute / 1e-5 relative, so the epsilon of a log (``Log(x² + 1e-10)``, a pitch tracker's spectrogram)
# was removed as "+ 0" and a silent frequency bin's log became −inf.
_NO_OP_RULES = frozenset(rewriter._no_op.rules.rules) - {rewriter._no_op.dropout_zero_rule,
                                                         rewriter._no_op.dropout_inference_rule}


def _exact_no_op_rules() -> list:
    """x + 0, x − 0, x · 1 and x / 1 (scalar constants exactly 0 or 1) → x."""
    made = []
    for op_type, neutral, commutes in (("Add", 0, True), ("Sub", 0, False), ("Mul", 1, True), ("Div", 1, False)):
        rule = rewriter.RewriteRule(_binary_pattern(op_type), lambda op, x, **_: op.Identity(x),
                                    _is_scalar(neutral))
        made += rule.commute() if commutes else [rule]
    return made


def _binary_pattern(op_type: str):
    def target(op, x, c):  # the pattern's variables are the function's parameters: op_type stays bound here
        return getattr(op, op_type)(x, c)
    return target


def _is_scalar(expected: float):
    def condition(context, x, c, **_):
        tensor = ir.convenience.get_const_tensor(c)
        return tensor is not None and tensor.shape.dims == () and tensor.numpy().item() == expected
    return condition


_REWRITE_RULES = (*(rule for rule in rewriter._DEFAULT_REWRITE_RULES
                    if rule._target_pattern.has_single_output_node and rule not in _NO_OP_RULES),
                  *_exact_no_op_rules(), *fold_conv_affine.RULES)
# Its HardSwish/HardSigmoid fusions are added: exporters without the ops (paddle2onnx, torch below opset 14)
# write them as Add/Clip/Div/Mul, which in an int8 model is four float kernels and two more requantizations
# between int8 convolutions, and in the float model four kernels ONNX Runtime does not fuse into the Conv.
# They round differently from the chain they replace (~1e-7), hence the option to leave them out.
ACTIVATION_FUSIONS = tuple(fuse_hardswish_rules().rules)
FUSED_OPS = ("HardSwish", "HardSigmoid")


def _optimize(model: ir.Model, rules: tuple) -> None:
    """``onnxscript.optimizer.optimize_ir`` (same passes, same order) with ``rules``: it takes no rule list of
    its own."""
    folding = onnxscript.optimizer.constant_folding
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([
            folding.FoldConstantsPass(shape_inference=True,
                                      input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                      output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
            rewriter.RewritePass(rules),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _restore_input_names(graph: ir.Graph, names: list[str]) -> None:
    """The optimizer renames an input that is also an output (``x`` → ``x_orig`` + ``Identity`` → ``x``); the
    model's interface keeps its names, so the output goes back to being the input itself."""
    for value, name in zip(graph.inputs, names):
        if value.name == name:
            continue
        for index, output in enumerate(list(graph.outputs)):
            producer = output.producer()
            if output.name == name and producer is not None and producer.op_type == "Identity" \
                    and producer.inputs[0] is value:
                graph.outputs[index] = value
                graph.remove(producer, safe=True)
        value.name = name


def _own_outputs(graph: ir.Graph) -> None:
    """Give an Identity to each output of the subgraph ``graph`` that no node of it makes, or that it returns
    twice. (onnx_ir's OutputFixPass misses outer-scope values and initializers, and renames the main graph's
    inputs when one is also an output.)"""
    seen = set()
    for index, value in enumerate(list(graph.outputs)):
        producer = value.producer()
        if producer is not None and producer.graph is graph and value not in seen:
            seen.add(value)
            continue
        identity = ir.Node("", "Identity", [value], name=f"{graph.name or 'graph'}_output_{index}", num_outputs=1)
        identity.outputs[0].name = f"{value.name}_{graph.name or 'graph'}_output_{index}"
        identity.outputs[0].dtype, identity.outputs[0].shape = value.dtype, value.shape
        graph.append(identity)
        graph.outputs[index] = identity.outputs[0]


def _reduced_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        const = node.inputs[1].const_value
        return None if const is None else [int(a) for a in const.numpy().ravel()]
    attr = node.attributes.get("axes")
    return None if attr is None else list(attr.as_ints())


def _spatial_means_to_global_pool(graph: ir.Graph) -> int:
    pooled = 0
    for node in list(graph):
        data = node.inputs[0] if node.op_type == "ReduceMean" and node.inputs else None
        if data is None or data.shape is None or len(data.shape) != 4:
            continue
        axes = _reduced_axes(node)
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        pool = ir.Node("", "GlobalAveragePool", [data], name=f"{node.name}_global_pool", num_outputs=1)
        pool.outputs[0].name = f"{node.outputs[0].name}_pooled"
        pool.outputs[0].dtype = data.dtype
        replacement = [pool]
        if node.attributes.get_int("keepdims", 1) == 0:
            flatten = ir.Node("", "Flatten", [pool.outputs[0]], attributes=[ir.AttrInt64("axis", 1)],
                              name=f"{node.name}_flatten", num_outputs=1)
            replacement.append(flatten)
        graph.insert_before(node, replacement)
        old, new = node.outputs[0], replacement[-1].outputs[0]
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        if new.is_graph_output():  # a graph output keeps its name
            old.name, new.name = f"{name}_replaced", name
        graph.remove(node, safe=True)
        pooled += 1
    return pooled
