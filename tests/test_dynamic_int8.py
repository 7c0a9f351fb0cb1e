"""Dynamic int8 MatMul/Gemm layers: run-time activation scales, fused by ONNX Runtime, chosen as an op set."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
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
