"""Dynamic int8 layers: MatMul/Gemm with run-time activation scales, fused by ONNX Runtime, chosen as an op set;
LSTMs as ONNX Runtime's DynamicQuantizeLSTM, their only int8 form."""

import json
from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import HOST_X86, make_model, write_feeds
from edgeq.cli import main
from edgeq.model_io import to_proto
from edgeq.passes.calibrate import CalibratePass
from edgeq.calibration_data import CalibrationData, InputSpec
from edgeq.passes.insert_qdq import DYNAMIC, InsertQDQPass
from edgeq.target import load_target

RULES = load_target(HOST_X86).quantization


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x[4,64] → MatMul → Relu → Gemm(transB, bias) → y, and a second MatMul reading x → z."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 0.2, "w"),
             numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.2, "g"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32) * 0.2, "v")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "g", "b"], ["y"], name="gemm", transB=1),
             helper.make_node("MatMul", ["x", "v"], ["z"], name="side")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16]),
                       helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 8])], inits)


def _run(proto: onnx.ModelProto, x: np.ndarray, optimized=None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(proto.SerializeToString(), options).run(None, {"x": x})


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def test_dynamic_layers_fuse_into_dynamic_kernels_and_stay_close(tmp_path):
    proto = _mlp()
    model = ir.from_proto(proto)
    insert = InsertQDQPass(RULES, {}, precisions={"mm": DYNAMIC, "gemm": DYNAMIC, "side": DYNAMIC})
    insert(model)
    quantized = to_proto(model)
    onnx.checker.check_model(quantized)
    assert {d.precision for d in insert.decisions.values()} == {DYNAMIC}
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2  # x is quantized once for both of its layers
    assert [o.name for o in quantized.graph.output] == ["y", "z"]
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    reference, got = _run(proto, x), _run(quantized, x, tmp_path / "opt.onnx")
    assert all(_sqnr(r, g) > 30 for r, g in zip(reference, got))
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    # a shared input is quantized once and its layers run as MatMulIntegerToFloat
    assert fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat") == 3
    assert "MatMulInteger" not in fused and "Cast" not in fused


def test_dynamic_scales_follow_inputs_that_calibration_did_not_see():
    """Static ranges come from calibration; inputs 20× larger saturate them, a run-time scale does not."""
    proto = _mlp()
    calib = CalibrationData.random([InputSpec("x", np.dtype(np.float32), (4, 64))], 16)
    x = 20 * np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    reference = _run(proto, x)
    built = {}
    for precision in ("int8", DYNAMIC):
        model = ir.from_proto(proto)
        calibrate = CalibratePass(calib, {"MatMul", "Gemm", "Relu"})
        calibrate(model)
        InsertQDQPass(RULES, calibrate.ranges, precisions=dict.fromkeys(("mm", "gemm", "side"), precision))(model)
        built[precision] = min(_sqnr(r, g) for r, g in zip(reference, _run(to_proto(model), x)))
    assert built[DYNAMIC] > 30 and built[DYNAMIC] > built["int8"] + 15


def test_float_wins_over_dynamic_and_unfit_gemms_say_why():
    proto = _mlp()
    proto.graph.node[2].attribute.append(helper.make_attribute("alpha", 0.5))
    model = ir.from_proto(proto)
    insert = InsertQDQPass(RULES, {}, keep_float={"side"},
                           precisions={"mm": DYNAMIC, "gemm": DYNAMIC, "side": DYNAMIC})
    insert(model)
    assert insert.decisions["mm"].precision == DYNAMIC
    assert not insert.decisions["gemm"].quantized and "alpha" in insert.decisions["gemm"].reason
    assert "side" not in insert.decisions or not insert.decisions["side"].quantized
    assert any(n.op_type == "MatMul" and n.name == "side" for n in model.graph)


def test_dynamic_matmul_is_an_op_set_of_targets_with_the_kernels(tmp_path):
    onnx.save(_mlp(), tmp_path / "mlp.onnx")
    feeds = write_feeds(tmp_path / "feeds", "x", (4, 64), 24)
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(tmp_path / "mlp.onnx"), "-t", HOST_X86, "--calib", str(feeds),
                                  "-o", str(tmp_path / "out"), "--optional-ops", "DynamicMatMul", "--no-measure",
                                  "--no-guard"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    decisions = manifest["quantization"]["decisions"]
    assert {decisions[n]["precision"] for n in ("mm", "gemm", "side")} == {DYNAMIC}
    assert manifest["fidelity"]["outputs"]["y"]["sqnr_db"] > 25
    no_kernels = runner.invoke(main, ["compile", str(tmp_path / "mlp.onnx"), "-t", "gpu-ampere", "--calib",
                                      str(feeds), "-o", str(tmp_path / "out2"), "--optional-ops", "DynamicMatMul",
                                      "--no-measure"])
    assert no_kernels.exit_code == 2 and "DynamicMatMul" in no_kernels.output


def test_a_layer_whose_input_calibration_saw_infinite_stays_static(tmp_path):
    """1/x is ±inf where x is 0: a run-time scale from that range would make every output NaN."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("Div", ["one", "x"], ["inv"], name="inv"),
             helper.make_node("MatMul", ["inv", "w"], ["y"], name="mm_inv"),
             helper.make_node("MatMul", ["x", "w"], ["z"], name="mm_x")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                        helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])], inits)
    onnx.save(proto, tmp_path / "inv.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(12):
        x = rng.standard_normal((2, 8)).astype(np.float32)
        x[0, i % 8] = 0.0
        np.savez(feeds / f"{i:03d}.npz", x=x)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "inv.onnx"), "-t", HOST_X86, "--calib", str(feeds),
                                       "-o", str(tmp_path / "out"), "--optional-ops", "DynamicMatMul",
                                       "--no-measure", "--no-guard"])
    assert result.exit_code == 0, result.output
    decisions = json.loads((tmp_path / "out" / "manifest.json").read_text())["quantization"]["decisions"]
    assert decisions["mm_x"]["precision"] == DYNAMIC and decisions["mm_inv"]["precision"] != DYNAMIC


def test_auto_measures_dynamic_int8_where_matmul_layers_hold_the_weights(tmp_path, conv_onnx, conv_feeds):
    onnx.save(_mlp(), tmp_path / "mlp.onnx")
    feeds = write_feeds(tmp_path / "mlp_feeds", "x", (4, 64), 24)
    labels = {}
    for name, model, data in (("mlp", tmp_path / "mlp.onnx", feeds), ("cnn", conv_onnx, conv_feeds)):
        result = CliRunner().invoke(main, ["compile", str(model), "-t", HOST_X86, "--calib", str(data), "-o",
                                           str(tmp_path / name), "--repeats", "5", "--no-guard"])
        assert result.exit_code == 0, result.output
        trials = json.loads((tmp_path / name / "manifest.json").read_text())["search"]["trials"]
        labels[name] = [t["label"] for t in trials if t["strategy"] == "op set"]
    assert any("DynamicMatMul" in label for label in labels["mlp"])
    assert labels["cnn"] and not any("DynamicMatMul" in label for label in labels["cnn"])  # a classifier only


def _lstm(layout: int = 0, seed: int = 0) -> onnx.ModelProto:
    """x[T=6, B=2, 16] → bidirectional LSTM (H=24; bias, initial state input, three outputs) → Y, Y_h, Y_c."""
    rng = np.random.default_rng(seed)
    hidden = 24
    inits = [numpy_helper.from_array(rng.standard_normal((2, 4 * hidden, 16)).astype(np.float32) * 0.3, "W"),
             numpy_helper.from_array(rng.standard_normal((2, 4 * hidden, hidden)).astype(np.float32) * 0.3, "R"),
             numpy_helper.from_array(rng.standard_normal((2, 8 * hidden)).astype(np.float32) * 0.1, "B")]
    x_shape, h_shape = ([2, 6, 16], [2, 2, hidden]) if layout else ([6, 2, 16], [2, 2, hidden])
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0"], ["y", "y_h", "y_c"], name="lstm",
                            hidden_size=hidden, direction="bidirectional", layout=layout)
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
                               helper.make_tensor_value_info("h0", TensorProto.FLOAT, h_shape)],
                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
                       (("y", [2, 6, 2, hidden] if layout else [6, 2, 2, hidden]), ("y_h", h_shape),
                        ("y_c", h_shape))],
                      inits, opset=14)


@pytest.mark.parametrize("per_channel", [True, False])
def test_an_lstm_becomes_a_dynamic_quantize_lstm_under_its_name(per_channel):
    proto = onnx.shape_inference.infer_shapes(_lstm())
    model = ir.from_proto(proto)
    insert = InsertQDQPass(replace(RULES, per_channel=per_channel), {}, precisions={"lstm": DYNAMIC})
    insert(model)
    quantized = to_proto(model)
    assert insert.decisions["lstm"].precision == DYNAMIC
    [node] = quantized.graph.node
    assert (node.op_type, node.domain, node.name) == ("DynamicQuantizeLSTM", "com.microsoft", "lstm")
    assert [o.name for o in quantized.graph.output] == ["y", "y_h", "y_c"]
    stored = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    w, w_scale = stored[node.input[1]], stored[node.input[8]]
    assert w.dtype == np.int8 and w.shape == (2, 16, 96)  # [directions, input, 4·hidden], as the kernel reads
    assert w_scale.shape == ((2, 96) if per_channel else (2,))
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((6, 2, 16)).astype(np.float32),
            "h0": rng.standard_normal((2, 2, 24)).astype(np.float32) * 0.5}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    reference = ort.InferenceSession(proto.SerializeToString(), options).run(None, feed)
    got = ort.InferenceSession(quantized.SerializeToString(), options).run(None, feed)
    assert all(_sqnr(r, g) > 30 for r, g in zip(reference, got))


def test_a_batch_first_lstm_stays_float_and_says_why():
    model = ir.from_proto(onnx.shape_inference.infer_shapes(_lstm(layout=1)))
    insert = InsertQDQPass(RULES, {}, precisions={"lstm": DYNAMIC})
    insert(model)
    assert not insert.decisions["lstm"].quantized and "layout 1" in insert.decisions["lstm"].reason
    assert [n.op_type for n in model.graph] == ["LSTM"]


def _outlier_lstm_model(path) -> tuple:
    """x[T=8, 1, 64] with an outlier feature that barely reaches the output → mm1 → Relu → LSTM(H=32) → mm2."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    w1[0] *= 0.002
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal((1, 128, 64)).astype(np.float32) * 0.2, "W"),
             numpy_helper.from_array(rng.standard_normal((1, 128, 32)).astype(np.float32) * 0.2, "R"),
             numpy_helper.from_array(np.array([8, 1, 32], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.3, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("LSTM", ["r", "W", "R"], ["s"], name="lstm", hidden_size=32),
             helper.make_node("Reshape", ["s", "shape"], ["t"], name="reshape"),
             helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2")]
    onnx.save(make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 1, 64])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 1, 16])], inits), path)
    x = rng.standard_normal((40, 8, 1, 64)).astype(np.float32)
    x[..., 0] = 500.0 * np.sign(rng.standard_normal((40, 8, 1)))
    return x


def test_lstms_are_dynamic_int8_layers_of_the_guard_where_the_target_has_the_kernel(tmp_path):
    """The guard measures the LSTM as a group of its own (built, not gated: it has no Q/DQ site), returns the
    outlier-fed MatMul to float and keeps the LSTM dynamic; a target without the kernel leaves it float."""
    x = _outlier_lstm_model(tmp_path / "m.onnx")
    for i, sample in enumerate(x):
        np.savez(tmp_path / f"feed_{i:02d}.npz", x=sample)
    feeds = tmp_path
    args = ["compile", str(tmp_path / "m.onnx"), "--calib", str(feeds), "--no-measure"]
    result = CliRunner().invoke(main, [*args, "-t", HOST_X86, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    report, decisions = manifest["guard"], manifest["quantization"]["decisions"]
    assert set(report["sensitivity"]) == {"mm1", "lstm", "mm2"} and report["sensitivity_gated_trials"] == 2
    assert report["float_groups"] == ["mm1"] and manifest["fidelity"]["guard"]["met"]
    assert decisions["lstm"]["precision"] == DYNAMIC and decisions["mm2"]["quantized"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node]
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    other = CliRunner().invoke(main, [*args, "-t", "gpu-ampere", "--no-guard", "-o", str(tmp_path / "gpu")])
    assert other.exit_code == 0, other.output
    decisions = json.loads((tmp_path / "gpu" / "manifest.json").read_text())["quantization"]["decisions"]
    assert "lstm" not in decisions
    assert "LSTM" in [n.op_type for n in onnx.load(str(tmp_path / "gpu" / "model.onnx")).graph.node]


def test_stacked_lstms_whose_final_states_are_concatenated_are_groups_of_their_own():
    """torch exports a 3-layer LSTM as three LSTMs and concatenates their final hidden states: a dynamic int8
    layer outputs float, so that Concat joins no group (Resemblyzer's first layer, reading raw mel power,
    lost 2.8 dB in int8 and took the two layers that held back to float with it)."""
    from edgeq.mixed.groups import layer_groups
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name) for name, shape in
             (("W1", (1, 64, 8)), ("R1", (1, 64, 16)), ("W2", (1, 64, 16)), ("R2", (1, 64, 16)))]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes = [helper.make_node("LSTM", ["x", "W1", "R1"], ["y1", "h1"], name="lstm1", hidden_size=16),
             helper.make_node("Squeeze", ["y1", "axis1"], ["x2"]),
             helper.make_node("LSTM", ["x2", "W2", "R2"], ["y2", "h2"], name="lstm2", hidden_size=16),
             helper.make_node("Concat", ["h1", "h2"], ["h"], axis=0)]
    proto = onnx.shape_inference.infer_shapes(make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 8])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 1, 16])], inits, opset=14))
    model = ir.from_proto(proto)
    insert = InsertQDQPass(RULES, {}, precisions={"lstm1": DYNAMIC, "lstm2": DYNAMIC})
    insert(model)
    groups = layer_groups(model, insert.decisions, ("float", "int8"), RULES.activation_fusions, 32)
    assert sorted(g.nodes for g in groups) == [("lstm1",), ("lstm2",)]
