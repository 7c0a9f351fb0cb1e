"""Checks of a model against ONNX Runtime itself: the input loads and runs, and a rewrite computes what the
original computed.

Rules:
- A model ONNX Runtime cannot load, or cannot run on the user's feeds, is a :class:`UserError` that says so
  (edgeq cannot do better than the runtime it targets). Where the model breaks ONNX's own op rules the error
  names the first node that does (subgraphs included) instead of quoting the runtime: an op of an ONNX domain
  that no opset defines (a TFLite or framework op its converter left in), an op defined only in a later opset
  than the model imports (a converter that wrote HardSwish into an opset-13 model), or a domain the model
  does not import.
- A model newer than the runtime reads (IR version above :data:`RUNTIME_MAX_IR`, default-domain opset above
  :data:`RUNTIME_MAX_OPSET`: what the newest onnx writes by default) is read through a copy at the IR version
  edgeq writes and the runtime's opset, relabelled where no op it uses changed in between
  (:func:`runtime_readable`); that copy is the original every check compares with.
- A rewritten model (normalized, converted to another opset) must load and, on a few calibration feeds, give
  every float output within ``tolerance`` relative error of the original (max |a − b| / max |a|, non-finite
  values equal where the original has them) and the same integer outputs. When it does not, the first value
  (in graph order) that differs from the original's value of the same name names the node to blame.
- Before normalizing, a declared graph output shape that the original's outputs on those feeds contradict is
  dropped (:func:`drop_contradicted_output_shapes`). After it, the main-graph values onnx's shape inference
  leaves untyped take the type ONNX Runtime computes for them (:func:`type_from_onnxruntime`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgeq.errors import UserError, first_line
from edgeq.model_io import all_nodes, load_model, load_proto, save_model
from edgeq.passes.convert_opset import ConvertOpsetPass, default_opset
from edgeq.passes.infer_shapes import InferShapesPass
from edgeq.passes.normalize import NormalizePass
from edgeq.runtimes.onnxruntime import create_session, run_exposing, transposes_optimized

# What the pinned ONNX Runtime (1.31) reads: newer IR versions and opsets are refused at load.
RUNTIME_MAX_IR = 13
RUNTIME_MAX_OPSET = 26
TOLERANCE = 1e-4
# A float16 model computed in float32 differs from itself by float16's rounding (2⁻¹¹ a step), not by 1e-4.
FLOAT16_TOLERANCE = 2e-2
CHECK_FEEDS = 3


def runtime_readable(model: ir.Model, path: Path, folder: Path) -> Path:
    """The file ONNX Runtime reads for ``model`` (loaded from ``path``): ``path``, else a copy saved in ``folder``
    of ``model``, relabelled in place (module rules)."""
    opset = default_opset(model)
    if model.ir_version <= RUNTIME_MAX_IR and opset <= RUNTIME_MAX_OPSET:
        return path
    if model.ir_version > onnx.IR_VERSION:
        raise UserError(f"the model is at IR version {model.ir_version}, which onnx {onnx.__version__} does not "
                        f"define yet (its newest: {onnx.IR_VERSION})", "save it with an older onnx")
    if opset > RUNTIME_MAX_OPSET:
        ConvertOpsetPass(RUNTIME_MAX_OPSET)(model)
    folder.mkdir(parents=True, exist_ok=True)
    return save_model(model, folder / path.name)  # at edgeq's IR version (model_io.MAX_IR_VERSION)


def load_in_onnxruntime(path: Path) -> ort.InferenceSession:
    """A CPU session for ``path``; a model that does not load is the user's to fix."""
    try:
        return create_session(path, intra_op_threads=1)
    except Exception as exc:  # noqa: BLE001 — ORT raises its own exception types
        problem = _breaks_op_rules(load_proto(path))  # nodes named as load names them
        raise UserError(*problem or (
            f"the model does not load in onnxruntime {ort.__version__} either ({first_line(exc)})",
            "fix or re-export the model so that onnxruntime loads it")) from None


_ONNX_DOMAINS = {"": "", "ai.onnx": "", "ai.onnx.ml": "ai.onnx.ml"}  # domains whose ops onnx.defs knows


@functools.cache
def _first_opsets() -> dict[tuple[str, str], int]:
    """(domain, op) → the first opset version that defines the op."""
    first: dict[tuple[str, str], int] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        key = (schema.domain, schema.name)
        first[key] = min(first.get(key, schema.since_version), schema.since_version)
    return first


def _breaks_op_rules(proto: onnx.ModelProto) -> tuple[str, str] | None:
    """(problem, fix) for the first node whose op the model's opset imports cannot provide, else None."""
    imports = {_ONNX_DOMAINS.get(o.domain, o.domain): o.version for o in proto.opset_import}
    local_functions = {(f.domain, f.name) for f in proto.functions}
    for node in all_nodes(proto.graph):
        domain = _ONNX_DOMAINS.get(node.domain, node.domain)
        what = f"node '{node.name}' ({node.op_type})"
        if domain not in imports and (node.domain, node.op_type) not in local_functions:
            return (f"{what} is in domain '{node.domain}', which the model does not import",
                    "re-export the model, or add the domain to its opset imports")
        if node.domain not in _ONNX_DOMAINS:
            continue  # a runtime's contrib ops or a model-local function: onnx.defs does not know them
        if not onnx.defs.has(node.op_type, domain):
            return (f"{what} is an op no ONNX opset defines (one its converter could not translate)",
                    f"re-export with a converter that writes {node.op_type} as ONNX ops, or replace that node")
        first = _first_opsets()[domain, node.op_type]
        if imports[domain] < first:
            return (f"{what} is defined from opset {first} on, but the model imports opset {imports[domain]}",
                    f"re-export with opset {first} or later")
    return None


def run_feeds(session: ort.InferenceSession, feeds: list[dict], what: str = "the model") -> list[list[np.ndarray]]:
    outputs = []
    for index, feed in enumerate(feeds):
        try:
            outputs.append(session.run(None, feed))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{what} fails in onnxruntime {ort.__version__} on feed {index} ({first_line(exc)})",
                            "check the feeds against what the model expects, or fix the model") from None
    return outputs


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |a − b| / max |a| over the finite values; inf where finiteness differs or shapes do."""
    if reference.shape != candidate.shape:
        return float("inf")
    if not np.issubdtype(reference.dtype, np.floating):
        return 0.0 if np.array_equal(reference, candidate) else float("inf")
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    finite = np.isfinite(ref)
    same_nonfinite = np.array_equal(np.isnan(ref), np.isnan(cand)) and np.array_equal(
        np.where(np.isinf(ref), ref, 0), np.where(np.isinf(cand), cand, 0))
    if not same_nonfinite:
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(ref[finite]).max()), 1e-12)
    return float(np.abs(ref[finite] - cand[finite]).max()) / scale


def max_relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """The largest :func:`relative_error` over a model's outputs."""
    return max((relative_error(r, c) for r, c in zip(reference, candidate)), default=0.0)


def check_same_function(original: Path, rewritten: Path, feeds: list[dict], reference: list[list[np.ndarray]],
                        what: str, tolerance: float = TOLERANCE) -> dict:
    """Raise a :class:`UserError` unless ``rewritten`` computes ``reference`` (the original's outputs on
    ``feeds``); returns the figures checked."""
    try:
        session = create_session(rewritten, intra_op_threads=1)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{what} made a model onnxruntime refuses ({first_line(exc)})",
                        "please report this model; --debug shows more") from None
    names = [o.name for o in session.get_outputs()]
    worst, worst_feed, worst_output = 0.0, 0, ""
    for index, (feed, expected) in enumerate(zip(feeds, reference)):
        try:
            got = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{what} made a model onnxruntime cannot run on feed {index} ({first_line(exc)})",
                            "please report this model; --debug shows more") from None
        for name, e, g in zip(names, expected, got):
            error = relative_error(e, g)
            if error > worst:
                worst, worst_feed, worst_output = error, index, name
    if worst > tolerance:
        node = _first_differing_node(original, rewritten, feeds[worst_feed], tolerance)
        raise UserError(f"{what} changed what the model computes (relative error {worst:.2g} on output "
                        f"'{worst_output}'{node})", "please report this model; meanwhile re-export it at a "
                        "recent opset (13 or later) so that edgeq has less to convert")
    return {"feeds": len(feeds), "max_relative_error": worst, "tolerance": tolerance}


def _first_differing_node(original: Path, rewritten: Path, feed: dict, tolerance: float) -> str:
    """', first differing at NODE (OP)' for the earliest value of ``rewritten`` whose namesake in ``original``
    holds other numbers; '' when none can be found."""
    try:
        before = onnx.shape_inference.infer_shapes(onnx.load(str(original)))
        after = onnx.shape_inference.infer_shapes(onnx.load(str(rewritten)))
        floats = _float_values(before) & _float_values(after)
        order = [(o, n) for n in after.graph.node for o in n.output if o in floats]
        names = [o for o, _ in order]
        expected = dict(zip(names, next(run_exposing(before, names, [feed]))))
        got = dict(zip(names, next(run_exposing(after, names, [feed]))))
    except Exception:  # noqa: BLE001 — localizing is best effort: the error line stands without it
        return ""
    for name, node in order:
        if relative_error(expected[name], got[name]) > tolerance:
            return f", first at node '{node.name}' ({node.op_type}) making '{name}'"
    return ""


def _float_values(proto: onnx.ModelProto) -> set[str]:
    infos = (*proto.graph.value_info, *proto.graph.output)
    return {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def normalize_checked(model: ir.Model, source: Path, feeds: list[dict], out_path: Path) -> tuple[ir.Model, dict]:
    """Normalize ``model`` (loaded from ``source``), save it to ``out_path``, and prove on ``feeds`` that it
    computes what ``source`` computes in ONNX Runtime; returns the normalized model and the check's figures.
    Normalize's rounding rewrites (activation fusions, spatial means as pools, loop-carried constants read as
    constants) round differently from the ops they replace; where that fails the check (an autoregressive
    decoder turns a 1e-7 difference into another token, a mean of 30,000 values summed in another order moves
    a squeeze-excite gate) the model is normalized again from ``source`` leaving out one of the rewrites it
    made, then all of them, and the figures say which and why (``rounding_rewrites``)."""
    reference = run_feeds(load_in_onnxruntime(source), feeds)
    normalize = NormalizePass(transpose_optimizer=transposes_optimized)
    try:
        return model, _normalize(model, normalize, source, feeds, reference, out_path)
    except UserError as refused:
        made = [flag for flag, count in (("fuse_activations", normalize.activations_fused),
                                         ("pool_means", normalize.means_pooled),
                                         ("loop_constants", normalize.loop_constants)) if count]
        if not made:
            raise
        reason = refused.problem
    retries = [[flag] for flag in made] + ([made] if len(made) > 1 else [])
    for left_out in retries:
        model = load_model(source)
        try:
            rewrites = NormalizePass(**dict.fromkeys(left_out, False), transpose_optimizer=transposes_optimized)
            check = _normalize(model, rewrites, source, feeds, reference, out_path)
        except UserError:
            if left_out is retries[-1]:
                raise
            continue
        return model, check | {"rounding_rewrites": f"left out {' and '.join(_REWRITES[f] for f in left_out)}: "
                                                    f"with them, {reason}"}


_REWRITES = {"fuse_activations": "the activation fusions", "pool_means": "the spatial means as pools",
             "loop_constants": "the loop-carried constants read as constants"}


def _normalize(model: ir.Model, normalize: NormalizePass, source: Path, feeds: list[dict], reference: list,
               out_path: Path) -> dict:
    dropped = drop_contradicted_output_shapes(model, reference)
    normalize(model)
    typed = type_from_onnxruntime(model, feeds[0])
    save_model(model, out_path)
    check = check_same_function(source, out_path, feeds, reference, "normalizing the model",
                                FLOAT16_TOLERANCE if normalize.float16_converted else TOLERANCE)
    changes = {"runtime_ops_unfused": normalize.runtime_ops_unfused, "loop_constants": normalize.loop_constants,
               "float16_to_float32": normalize.float16_converted, "activations_fused": normalize.activations_fused,
               "weights_in_inputs": normalize.weights_in_inputs, "weights_folded": normalize.weights_folded,
               "transposes_cancelled": normalize.transposes_cancelled,
               "output_shapes_dropped": dropped, "types_from_onnxruntime": typed}
    return check | {key: value for key, value in changes.items() if value}


def type_from_onnxruntime(model: ir.Model, feed: dict) -> int:
    """Main-graph node outputs that shape inference left untyped take the element type and rank of the tensor
    ONNX Runtime computes for them on ``feed``, and shape inference then types what follows them. onnx has no
    schema for another domain's ops — the com.microsoft ops ONNX Runtime's transformer optimizer writes
    (SkipLayerNormalization, BiasGelu, FastGelu) — so every value after the first such node was untyped, and
    untyped values are neither calibrated nor quantized (a BERT: 5 of 16 MatMuls). Returns how many.
    (ONNX Runtime's symbolic shape inference, a tool script, knows the contrib ops it lists; a run types
    whatever the runtime itself runs, with the runtime's own answer, and only models that need it pay for it.)"""
    untyped = [value for node in model.graph for value in node.outputs if value.name and value.type is None]
    if not untyped:
        return 0
    computed = next(run_exposing(ir.to_proto(model), [value.name for value in untyped], [feed]))
    typed = 0
    for value, array in zip(untyped, computed):
        if isinstance(array, np.ndarray):  # a sequence or an optional stays as it is
            value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
            value.shape = ir.Shape([None] * array.ndim)
            typed += 1
    InferShapesPass()(model)
    return typed


def drop_contradicted_output_shapes(model: ir.Model, reference: list[list[np.ndarray]]) -> list[str]:
    """Graph outputs whose declared shape the model's own outputs on the check feeds contradict (rank, or a
    fixed dim) lose it, and shape inference gives them one: ONNX Runtime never checks a declared output shape,
    exporters write wrong ones (a torch 1.9 OCR model declared [1, seqlen] for a [25, 1, 8210] output), and the
    optimizer folds a Reshape's target from them. Returns the names of those outputs."""
    dropped = []
    for index, value in enumerate(model.graph.outputs):
        declared = value.shape
        if declared is None:
            continue
        for outputs in reference:
            actual = np.shape(outputs[index])
            if len(actual) != len(declared) or any(isinstance(d, int) and d != a for d, a in zip(declared, actual)):
                value.shape = None
                dropped.append(value.name)
                break
    return dropped
