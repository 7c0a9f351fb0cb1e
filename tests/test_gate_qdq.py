"""The gated QDQ model: one model whose sites switch quantization on stands for each one-group build."""

import numpy as np
import onnx_ir as ir
import pytest

from conftest import conv_model
from edgeq.calibration_data import CalibrationData, InputSpec
from edgeq.mixed.groups import layer_groups
from edgeq.mixed.sensitivity import output_nsr
from edgeq.passes.calibrate import CalibratePass
from edgeq.passes.gate_qdq import GATES, GateQDQPass
from edgeq.passes.insert_qdq import InsertQDQPass
from edgeq.passes.normalize import NormalizePass
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import load_target
from test_mixed_precision import mlp_model

TARGET = load_target("x86-avx512-vnni")
RULES = TARGET.quantization


def _calibrated(proto):
    model = ir.from_proto(proto)
    NormalizePass()(model)
    specs = [InputSpec(v.name, np.dtype(np.float32), tuple(v.shape)) for v in model.graph.inputs]
    ops = set(RULES.compute_ops + RULES.requant_ops + RULES.passthrough_ops + RULES.activation_fusions)
    calib = CalibratePass(CalibrationData.random(specs, 16, seed=1), ops)
    calib(model)
    return model, calib.ranges, CalibrationData.random(specs, 4, seed=2)


def _saved(model: ir.Model, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path)
    return path


@pytest.mark.parametrize("make", [conv_model, mlp_model], ids=["cnn-residual", "mlp-concat"])
def test_each_groups_gates_reproduce_its_one_group_build(tmp_path, make):
    model, ranges, feeds = _calibrated(make())
    uniform = model.clone()
    insert = InsertQDQPass(RULES, ranges)
    insert(uniform)
    gate = GateQDQPass(model)
    gate(uniform)
    runtime = OnnxRuntime(TARGET)
    gated = runtime.session(_saved(uniform, tmp_path / "gated" / "model.onnx"), optimized=False)
    float_path = _saved(model.clone(), tmp_path / "float" / "model.onnx")
    reference = [runtime.session(float_path).run(f.inputs) for f in feeds]
    off = [gated.run(f.inputs | {GATES: np.zeros(len(gate.sites), bool)}) for f in feeds]
    assert output_nsr(reference, off) < 1e-10  # all gates off: the float model

    groups = layer_groups(model, insert.decisions, ("float", "int8"), RULES.activation_fusions, 32)
    all_float = {node: "float" for g in groups for node in g.nodes}
    assert len(groups) >= 3
    for group in groups:
        precisions = all_float | dict.fromkeys(group.nodes, "int8")
        nodes, tensors = InsertQDQPass(RULES, ranges, precisions=precisions).planned(model)
        gates = np.zeros(len(gate.sites), bool)
        gates[[gate.sites[s] for s in tensors | (nodes & gate.sites.keys())]] = True
        built = model.clone()
        InsertQDQPass(RULES, ranges, precisions=precisions)(built)
        session = runtime.session(_saved(built, tmp_path / group.name / "model.onnx"))
        measured = output_nsr(reference, [session.run(f.inputs) for f in feeds])
        estimated = output_nsr(reference, [gated.run(f.inputs | {GATES: gates}) for f in feeds])
        assert measured > 0 and estimated == pytest.approx(measured, rel=0.1), group.name


def test_an_activation_is_computed_in_each_branch_not_copied():
    """ONNX Runtime copies a value a branch passes on: a site's producer moves into both branches instead,
    and only an activation without a producer to move (here the graph input) is passed on."""
    model, ranges, _ = _calibrated(conv_model())
    uniform = model.clone()
    InsertQDQPass(RULES, ranges)(uniform)
    gate = GateQDQPass(model)
    gate(uniform)
    passing = {}
    for node in uniform.graph:
        if node.op_type == "If" and node.inputs[0].name.removesuffix("_gate") in gate.sites:
            passing[node.name] = [n.op_type for n in node.attributes["else_branch"].value]
    activations = {name: ops for name, ops in passing.items() if "_gated_input" not in name}
    assert activations.pop("x_gated_If") == ["Identity"]
    assert activations and all(ops != ["Identity"] for ops in activations.values()), activations
    weights = [ops for name, ops in passing.items() if "_gated_input" in name]
    assert weights and all(ops == ["Identity"] for ops in weights)


def test_a_model_with_qdq_in_a_subgraph_is_refused():
    from test_insert_qdq import _if_model

    ranges = {name: (-4.0, 4.0) for name in ("x", "then_mm", "then_out", "else_mm", "else_out")}
    quantized = ir.from_proto(_if_model())
    InsertQDQPass(RULES, ranges)(quantized)
    with pytest.raises(ValueError, match="subgraph"):
        GateQDQPass(ir.from_proto(_if_model()))(quantized)
