from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, make_model
from edgeq.calibration_data import CalibrationData, InputSpec
from edgeq.model_io import to_proto
from edgeq.passes.calibrate import CalibratePass
from edgeq.passes.exclude import ExcludePass
from edgeq.passes.insert_qdq import InsertQDQPass, activation_qparams, weight_quantize
from edgeq.passes.normalize import NormalizePass
from edgeq.recipe import Exclusions
from edgeq.target import load_target

RULES = load_target("x86-avx512-vnni").quantization
OPS = set(RULES.compute_ops + RULES.requant_ops + RULES.passthrough_ops + RULES.activation_fusions)


def quantize(proto: onnx.ModelProto, feeds=16, exclusions=Exclusions(), rules=RULES, keep_float=()):
    model = ir.from_proto(proto)
    NormalizePass()(model)
    ExcludePass(exclusions)(model)
    specs = [InputSpec(v.name, np.dtype(np.float32), tuple(d if isinstance(d, int) else 1 for d in v.shape))
             for v in model.graph.inputs]
    ops = set(rules.compute_ops + rules.requant_ops + rules.passthrough_ops + rules.activation_fusions)
    calib = CalibratePass(CalibrationData.random(specs, feeds), ops)
    calib(model)
    insert = InsertQDQPass(rules, calib.ranges, set(keep_float))
    insert(model)
    return to_proto(model), insert


def optimized_ops(proto: onnx.ModelProto, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), options)
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_weight_quantization_is_symmetric_per_channel():
    w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    q, scale = weight_quantize(w, axis=0, reduce_range=False)
    np.testing.assert_allclose(scale, [2 / 127, 0.5 / 127], rtol=1e-6)
    assert q[0, 1] == -127 and q[1, 0] == 127
    q7, _ = weight_quantize(w, axis=0, reduce_range=True)
    assert np.abs(q7).max() == 63


def test_activation_qparams_by_signedness():
    u = activation_qparams(0.0, 2.55, "uint8")
    assert u.zero_point == 0 and u.scale == pytest.approx(0.01)
    s = activation_qparams(-1.0, 1.0, "int8")
    assert s.zero_point in (-1, 0) and s.scale == pytest.approx(2 / 255)


def test_cnn_gets_fused_integer_kernels_and_stays_close(tmp_path):
    proto = conv_model()
    quant, insert = quantize(proto)
    nodes = {n.name: n for n in quant.graph.node}
    # per-channel weights on axis 0, int32 bias with scale s_in * s_w
    dq_w = nodes["w1_axis0_DequantizeLinear"]
    assert helper.get_attribute_value(dq_w.attribute[0]) == 0
    inits = {i.name: numpy_helper.to_array(i) for i in quant.graph.initializer}
    assert inits["w1_axis0_quantized"].dtype == np.int8 and inits["w1_axis0_scale"].shape == (16,)
    assert inits["conv1_bias_quantized"].dtype == np.int32
    np.testing.assert_allclose(inits["conv1_bias_scale"], inits["x_scale"] * inits["w1_axis0_scale"], rtol=1e-6)
    # Gemm with transB=1: output channels on axis 0
    assert inits["wf_axis0_scale"].shape == (10,)
    # the Relu after conv1 is fused: quantized tensor is r1, not c1
    assert "r1_QuantizeLinear" in nodes and "c1_QuantizeLinear" not in nodes
    # MaxPool (passthrough) output shares its input's scale
    assert inits["p1_scale"] == inits["r1_scale"]
    # ORT fuses everything into integer kernels
    ops = optimized_ops(quant, tmp_path)
    assert ops.count("QLinearConv") == 2 and "QGemm" in ops and "QLinearAdd" in ops, ops
    assert "Conv" not in ops and "FusedConv" not in ops
    assert all(d.quantized for n, d in insert.decisions.items() if d.op_type in ("Conv", "Gemm", "Add"))
    # output name kept, values close to float
    assert [o.name for o in quant.graph.output] == ["y"]
    x = {"x": np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, x)[0]
    got = ort.InferenceSession(quant.SerializeToString()).run(None, x)[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99


def test_no_island_between_float_ops():
    """Add between two float-only ops (Softmax, Exp) must stay float: Q/DQ there would buy nothing."""
    nodes = [helper.make_node("Softmax", ["x"], ["s"], name="softmax"),
             helper.make_node("Exp", ["x"], ["e"], name="exp"),
             helper.make_node("Add", ["s", "e"], ["a"], name="add"),
             helper.make_node("Sigmoid", ["a"], ["y"], name="sigmoid")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    quant, insert = quantize(proto)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quant.graph.node)
    assert "island" in insert.decisions["add"].reason


def test_activation_matmul_quantizes_both_inputs_and_constant_matmul_per_column():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["y"], name="scores")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])],
                       [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")])
    quant, insert = quantize(proto)
    inits = {i.name: numpy_helper.to_array(i) for i in quant.graph.initializer}
    assert inits["w_axis1_scale"].shape == (6,)
    assert insert.decisions["scores"].quantized and insert.decisions["t"].quantized
    q_inputs = {n.input[0] for n in quant.graph.node if n.op_type == "QuantizeLinear"}
    assert {"x", "h", "ht", "y_float"} <= q_inputs


def test_exclusions_and_keep_float_stay_float():
    quant, insert = quantize(conv_model(), exclusions=Exclusions(op_types=("Gemm",)), keep_float={"conv2"})
    assert insert.decisions["fc"].reason == "excluded by op type"
    assert "slower" in insert.decisions["conv2"].reason
    conv_inputs = {n.name: n.input for n in quant.graph.node}
    assert conv_inputs["fc"][1] == "wf" and conv_inputs["conv2"][1] == "w2"
    assert conv_inputs["conv1"][1] == "w1_axis0_dequantized"


def test_a_float_conv_between_quantized_neighbours_keeps_its_float_weight(tmp_path):
    """conv2 kept float reads p1, which conv1's int8 region dequantizes per tensor: ONNX Runtime would give
    its float weight per-tensor int8 (WeightBiasQuantization) and fuse it into a QLinearConv. Through its own
    per-channel DequantizeLinear it stays a float Conv in the optimized session."""
    quant, insert = quantize(conv_model(), keep_float={"conv2"})
    assert insert.decisions["conv1"].quantized and not insert.decisions["conv2"].quantized
    reader = next(n for n in quant.graph.node if n.name == "conv2").input[0]
    dq = next(n for n in quant.graph.node if n.output[0] == reader)
    assert dq.op_type == "DequantizeLinear" and next(a.i for a in dq.attribute if a.name == "axis") == 1
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(quant.SerializeToString(), options)
    optimized = {n.name: n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in optimized.values()  # conv1
    assert not any(op == "QLinearConv" and name.startswith("conv2") for name, op in optimized.items())


def _if_model():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_mm"], name=f"{name}_matmul"),
                                  helper.make_node("Relu", [f"{name}_mm"], [f"{name}_out"], name=f"{name}_relu")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])


def test_compute_inside_if_branches_is_calibrated_and_quantized(tmp_path):
    proto = _if_model()
    model = ir.from_proto(proto)
    NormalizePass()(model)
    rng = np.random.default_rng(1)
    for i in range(8):
        np.savez(tmp_path / f"{i}.npz", x=rng.standard_normal((1, 8)).astype(np.float32), cond=np.array(i % 2 == 0))
    specs = [InputSpec("x", np.dtype(np.float32), (1, 8)), InputSpec("cond", np.dtype(bool), ())]
    calib = CalibratePass(CalibrationData.from_path(tmp_path, specs), OPS)
    calib(model)
    assert {"then_mm", "then_out", "else_mm", "else_out", "x"} <= set(calib.ranges)
    insert = InsertQDQPass(RULES, calib.ranges)
    insert(model)
    assert insert.decisions["then_matmul"].quantized and insert.decisions["else_matmul"].quantized
    assert insert.subgraph_compute_left_float == 0
    quant = to_proto(model)
    onnx.checker.check_model(quant, full_check=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    for cond in (True, False):
        feed = {"x": rng.standard_normal((1, 8)).astype(np.float32), "cond": np.array(cond)}
        ref = ort.InferenceSession(proto.SerializeToString()).run(None, feed)[0]
        got = ort.InferenceSession(quant.SerializeToString(), options).run(None, feed)[0]
        assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
    branches = [a.g for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node for a in n.attribute if a.g.node]
    assert all("QLinearMatMul" in [n.op_type for n in b.node] for b in branches) and len(branches) == 2


def _loop_model(scale: float | None = None):
    """h ← h · w, n times, in a Loop body (w random, or ``scale`` · identity plus a little noise)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 8)) if scale is None else scale * np.eye(8) + 0.05 * rng.standard_normal((8, 8))
    w = numpy_helper.from_array(weight.astype(np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["h_out"], name="body_matmul"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("n", TensorProto.INT64, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    return proto


def test_compute_inside_a_loop_body_is_calibrated_over_iterations_and_quantized(tmp_path):
    """The body's MatMul grows h by ×1.5 per iteration: its output range must cover the last iteration, and
    the body runs as an integer kernel in ONNX Runtime."""
    proto = _loop_model(scale=1.5)
    model = ir.from_proto(proto)
    NormalizePass()(model)
    rng = np.random.default_rng(1)
    finals, largest_x = [], 0.0
    for i in range(6):
        feed = {"x": rng.standard_normal((1, 8)).astype(np.float32), "n": np.array(3)}
        largest_x = max(largest_x, float(feed["x"].max()))
        np.savez(tmp_path / f"{i}.npz", **feed)
        finals.append(ort.InferenceSession(proto.SerializeToString()).run(None, feed)[0])
    specs = [InputSpec("x", np.dtype(np.float32), (1, 8)), InputSpec("n", np.dtype(np.int64), ())]
    calib = CalibratePass(CalibrationData.from_path(tmp_path, specs), OPS)
    calib(model)
    assert calib.subgraphs["observed"] == "all subgraphs" and not calib.subgraphs["fell_back_from"]
    assert calib.ranges["h_out"][1] >= max(float(f.max()) for f in finals) * 0.999
    assert calib.ranges["h_in"][1] > largest_x * 1.5  # the iterations after the first were seen
    insert = InsertQDQPass(RULES, calib.ranges)
    insert(model)
    assert insert.decisions["body_matmul"].quantized and insert.subgraph_compute_left_float == 0
    quant = to_proto(model)
    onnx.checker.check_model(quant, full_check=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    feed = {"x": rng.standard_normal((1, 8)).astype(np.float32), "n": np.array(3)}
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, feed)[0]
    got = ort.InferenceSession(quant.SerializeToString(), options).run(None, feed)[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
    body = next(a.g for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node for a in n.attribute if a.g.node)
    assert "QLinearMatMul" in [n.op_type for n in body.node]


def test_shared_weight_is_quantized_once():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="second")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                       [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    quant, insert = quantize(proto)
    assert insert.decisions["first"].quantized and insert.decisions["second"].quantized
    assert [i.name for i in quant.graph.initializer].count("w_axis1_quantized") == 1
    assert sum(n.name == "w_axis1_DequantizeLinear" for n in quant.graph.node) == 1


def test_an_input_passed_through_as_an_output_keeps_its_name_and_value():
    """A model that also outputs its input (an image echoed beside the detections): the quantized input's
    output used to take the dequantized value and rename the input itself, so no feed matched it."""
    rng = np.random.default_rng(0)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    quant, insert = quantize(proto)
    assert insert.decisions["fc"].quantized
    assert [i.name for i in quant.graph.input] == ["x"] and [o.name for o in quant.graph.output] == ["y", "x"]
    x = rng.standard_normal((1, 8)).astype(np.float32)
    echoed = ort.InferenceSession(quant.SerializeToString()).run(["x"], {"x": x})[0]
    np.testing.assert_array_equal(echoed, x)


def test_conv_transpose_follows_the_target():
    """The ORT CPU targets have no integer ConvTranspose kernel, so it stays float; a target that lists it
    gets per-channel weights on axis 1 (output channels)."""
    from dataclasses import replace

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", strides=[2, 2])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 17, 17])],
                       [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w"),
                        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")])
    quant, insert = quantize(proto)
    assert "up" not in insert.decisions and not any(n.op_type == "QuantizeLinear" for n in quant.graph.node)
    rules = replace(RULES, compute_ops=RULES.compute_ops + ("ConvTranspose",))
    quant, insert = quantize(proto, rules=rules)
    inits = {i.name: numpy_helper.to_array(i) for i in quant.graph.initializer}
    assert insert.decisions["up"].quantized and inits["w_axis1_scale"].shape == (8,)


def _conv_op_conv(op_nodes, inits, out_hw):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"), *op_nodes,
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, *out_hw])], weights + inits)


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


@pytest.mark.parametrize("op_nodes, inits, out_hw", [
    ([helper.make_node("Resize", ["a", "", "sc"], ["b"], name="mid", mode="nearest")],
     [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")], [16, 16]),
    ([helper.make_node("Slice", ["a", "st", "en", "ax"], ["b"], name="mid")],
     [_ints("st", [0]), _ints("en", [4]), _ints("ax", [2])], [4, 8]),
    ([helper.make_node("Gather", ["a", "gi"], ["b"], name="mid", axis=2)], [_ints("gi", [0, 2, 4])], [3, 8]),
    ([helper.make_node("AveragePool", ["a"], ["b"], name="mid", kernel_shape=[2, 2], strides=[2, 2])], [], [4, 4]),
    ([helper.make_node("MaxPool", ["a"], ["b"], name="mid", kernel_shape=[2, 2], strides=[2, 2])], [], [4, 4]),
    ([helper.make_node("LeakyRelu", ["a"], ["b"], name="mid", alpha=0.1)], [], [8, 8]),
    ([helper.make_node("Sigmoid", ["a"], ["b"], name="mid")], [], [8, 8]),
    ([helper.make_node("Mul", ["a", "a"], ["b"], name="mid")], [], [8, 8]),
], ids=["Resize", "Slice", "Gather", "AveragePool", "MaxPool", "LeakyRelu", "Sigmoid", "Mul"])
def test_target_ops_run_as_integer_kernels_in_ort(tmp_path, op_nodes, inits, out_hw):
    """What the x86 target declares as requant/passthrough must really stay integer in ORT: between the two
    QLinearConvs no DequantizeLinear/QuantizeLinear is left."""
    quant, insert = quantize(_conv_op_conv(op_nodes, inits, out_hw))
    assert insert.decisions["mid"].quantized
    ops = optimized_ops(quant, tmp_path)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops


def test_ranges_by_method_reuse_the_calibration_histograms(tmp_path):
    """A percentile calibration keeps its histograms: every method's range of a tensor comes from them and equals
    what a fresh run over the same data (a calibration served from the cache keeps none) decides."""
    model = ir.from_proto(conv_model())
    NormalizePass()(model)
    specs = [InputSpec("x", np.dtype(np.float32), (1, 3, 16, 16))]
    data = CalibrationData.random(specs, 8, seed=3)
    ran = CalibratePass(data, OPS, "percentile", model_digest="conv", cache_dir=tmp_path)
    ran(model)
    cached = CalibratePass(data, OPS, "percentile", model_digest="conv", cache_dir=tmp_path)
    cached(model)
    assert cached.cache_hit and not ran.cache_hit
    names = sorted(ran.ranges)
    kept, fresh = ran.ranges_by_method(model, names), cached.ranges_by_method(model, names)
    assert set(kept) == set(names) and kept == fresh
    assert any(len(set(by.values())) > 1 for by in kept.values())  # the methods differ somewhere


def _masked_attention(fill: float) -> onnx.ModelProto:
    """x[1, 8, 16], a padding mask from an int64 attention_mask ([1, 8]: 1 keep, 0 pad) written as
    Where(mask, 0, fill) — Hugging Face's float32 lowest value, or −inf — added to the scores before Softmax."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.5, n)
             for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(fill, np.float32), "fill"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("MatMul", ["x", w], [n], name=f"mm_{n}") for w, n in
             (("wq", "q"), ("wk", "k"), ("wv", "v"))]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
              helper.make_node("Cast", ["attention_mask"], ["keep"], name="keep", to=TensorProto.BOOL),
              helper.make_node("Unsqueeze", ["keep", "axis1"], ["keep3"], name="keep3"),
              helper.make_node("Where", ["keep3", "zero", "fill"], ["mask"], name="mask"),
              helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
              helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
              helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="out")]
    return _token_model(nodes, inits, "attention_mask", 8)


def _token_model(nodes, inits, second: str, tokens: int) -> onnx.ModelProto:
    """x [1, tokens, 16] float and ``second`` [1, tokens] int64 in, y [1, tokens, 16] out."""
    return onnx.shape_inference.infer_shapes(make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, 16]),
                helper.make_tensor_value_info(second, TensorProto.INT64, [1, tokens])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, 16])], inits))


def _saved_feeds(feeds: list[dict], folder, second: str, tokens: int) -> CalibrationData:
    """``feeds`` written to ``folder`` and read back as calibration data of a :func:`_token_model`."""
    for i, feed in enumerate(feeds):
        np.savez(folder / f"feed_{i}.npz", **feed)
    return CalibrationData.from_path(folder, [InputSpec("x", np.dtype(np.float32), (1, tokens, 16)),
                                              InputSpec(second, np.dtype(np.int64), (1, tokens))])


def _sqnr_db(proto: onnx.ModelProto, model: ir.Model, feeds: list[dict]) -> float:
    """The quantized ``model``'s output SQNR against ``proto``'s on ``feeds``."""
    reference = ort.InferenceSession(proto.SerializeToString())
    quantized = ort.InferenceSession(to_proto(model).SerializeToString())
    ref = np.concatenate([reference.run(None, f)[0] for f in feeds])
    out = np.concatenate([quantized.run(None, f)[0] for f in feeds])
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((out - ref) ** 2))


@pytest.mark.parametrize("fill", [float(np.finfo(np.float32).min), float("-inf")])
def test_an_attention_mask_add_stays_float(fill, tmp_path):
    """Quantized, the Add of the mask would keep neither −3.4e38 (a range over it rounds every score to 0) nor
    −inf (saturated to the range's end): padded positions would be attended. It stays float, and says why;
    the projections and the attention products stay int8."""
    proto = _masked_attention(fill)
    rng = np.random.default_rng(1)
    feeds = []
    for i in range(8):
        keep = np.ones((1, 8), np.int64)
        keep[0, 8 - i % 4:] = 0  # 0 to 3 padded positions
        feeds.append({"x": rng.standard_normal((1, 8, 16)).astype(np.float32), "attention_mask": keep})
    data = _saved_feeds(feeds, tmp_path, "attention_mask", 8)
    model = ir.serde.deserialize_model(proto)
    rules = load_target("x86-avx512-vnni").quantization
    calibrate = CalibratePass(data, set(rules.compute_ops + ("Add", "Softmax")), "percentile")
    calibrate(model)
    assert "mask" in calibrate.nonfinite
    insert = InsertQDQPass(replace(rules, requant_ops=("Add",)), calibrate.ranges, unbounded=set(calibrate.nonfinite))
    insert(model)
    assert not insert.decisions["mask_add"].quantized and "−3.4e38" in insert.decisions["mask_add"].reason
    assert all(insert.decisions[n].quantized for n in ("mm_q", "mm_k", "mm_v", "qk", "pv", "out"))
    assert _sqnr_db(proto, model, feeds) > 25


def _rotary_attention_input() -> onnx.ModelProto:
    """x[1, 64, 16] projected to q and rotated as Hugging Face's Llama does: angles = inverse frequencies
    (expanded at run time) × position_ids, as a MatMul of two activations, → Transpose → Concat(f, f) →
    Cos/Sin; q·cos + rotate_half(q)·sin; an output projection."""
    rng = np.random.default_rng(0)
    inv_freq = 1.0 / 10000 ** (np.arange(0, 16, 2, dtype=np.float32) / 16)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.5, n) for n in ("wq", "wo")]
    inits += [numpy_helper.from_array(inv_freq.reshape(1, 8, 1), "inv_freq"),
              numpy_helper.from_array(np.array([8, 1], np.int64), "freq_dims"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1"),
              numpy_helper.from_array(np.array([0], np.int64), "start"),
              numpy_helper.from_array(np.array([8], np.int64), "half"),
              numpy_helper.from_array(np.array([16], np.int64), "end"),
              numpy_helper.from_array(np.array([2], np.int64), "last")]
    nodes = [helper.make_node("Shape", ["position_ids"], ["pos_shape"], end=1),
             helper.make_node("Concat", ["pos_shape", "freq_dims"], ["inv_shape"], axis=0),
             helper.make_node("Expand", ["inv_freq", "inv_shape"], ["inv_expanded"], name="inv_expand"),
             helper.make_node("Cast", ["position_ids"], ["pos_float"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["pos_float", "axis1"], ["pos3"]),
             helper.make_node("MatMul", ["inv_expanded", "pos3"], ["freqs"], name="rope_mm"),
             helper.make_node("Transpose", ["freqs"], ["freqs_t"], name="freqs_t", perm=[0, 2, 1]),
             helper.make_node("Concat", ["freqs_t", "freqs_t"], ["emb"], name="emb", axis=-1),
             helper.make_node("Cos", ["emb"], ["cos"]), helper.make_node("Sin", ["emb"], ["sin"]),
             helper.make_node("MatMul", ["x", "wq"], ["q"], name="mm_q"),
             helper.make_node("Slice", ["q", "start", "half", "last"], ["q1"]),
             helper.make_node("Slice", ["q", "half", "end", "last"], ["q2"]),
             helper.make_node("Neg", ["q2"], ["q2n"]),
             helper.make_node("Concat", ["q2n", "q1"], ["q_rot"], axis=-1),
             helper.make_node("Mul", ["q", "cos"], ["q_cos"], name="q_cos"),
             helper.make_node("Mul", ["q_rot", "sin"], ["q_sin"], name="q_sin"),
             helper.make_node("Add", ["q_cos", "q_sin"], ["q_embed"], name="q_embed"),
             helper.make_node("MatMul", ["q_embed", "wo"], ["y"], name="out")]
    return _token_model(nodes, inits, "position_ids", 64)


def test_an_angle_a_sin_or_cos_reads_stays_float(tmp_path):
    """Positions × frequencies over 8 bits would move a rotary angle by up to a step of 0.4 rad at the
    highest frequency; the angle's MatMul and the Concat that carries it stay float, saying why, while the
    projections, the rotation's products and the sum stay int8."""
    proto = _rotary_attention_input()
    rng = np.random.default_rng(1)
    feeds = []
    for i in range(8):
        start = int(rng.integers(0, 200))
        feeds.append({"x": rng.standard_normal((1, 64, 16)).astype(np.float32),
                      "position_ids": np.arange(start, start + 64, dtype=np.int64)[None]})
    data = _saved_feeds(feeds, tmp_path, "position_ids", 64)
    model = ir.serde.deserialize_model(proto)
    rules = load_target("x86-avx512-vnni").quantization  # "all": Add, Mul, Concat, products of activations
    calibrate = CalibratePass(data, set(rules.compute_ops + rules.requant_ops + rules.passthrough_ops), "percentile")
    calibrate(model)
    insert = InsertQDQPass(rules, calibrate.ranges)
    insert(model)
    for name in ("rope_mm", "freqs_t", "emb"):
        assert not insert.decisions[name].quantized and "angle" in insert.decisions[name].reason
    assert all(insert.decisions[n].quantized for n in ("mm_q", "q_cos", "q_sin", "q_embed", "out"))
    assert _sqnr_db(proto, model, feeds) > 25
