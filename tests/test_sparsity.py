"""2:4 sparsity: the pattern and checker, the solver, the passes, and the compile end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import EXAMPLES, HOST_X86, make_model
from edgeq.passes.exclude import EXCLUDE_KEY
from edgeq.passes.layer_inputs import LayerInputsPass, conv_geometry, conv_patches
from edgeq.passes.permute_channels import PermuteChannelsPass, kept_share
from edgeq.passes.sparsify import Sparsify24Pass, eligible_layers, layer_view, prunable
from onnx import TensorProto, helper, numpy_helper

from edgeq.calibration_data import CalibrationData, input_specs
from edgeq.cli import main
from edgeq.model_io import load_model, save_model
from edgeq.sparse24 import KEY, check_model, compressed_bytes, magnitude_mask, obeys
from edgeq.quant.obs import output_error
from edgeq.sparse_solver import (
    prune_magnitude,
    prune_reconstruct,
    search_permutation,
)
from edgeq.target import SparsityRules

RULES = SparsityRules(patterns=("2:4",), ops=("Conv", "Gemm", "MatMul"), min_in_channels=8, min_out_channels=8,
                      in_channel_multiple=4)


def _run(model: onnx.ModelProto | ir.Model, feeds: dict) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _init(rng, shape, name, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


# the pattern, the checker, the solver --------------------------------------------------------------------
def test_magnitude_mask_keeps_the_two_largest_of_every_four():
    rows = np.array([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.0]], dtype=np.float32)
    assert magnitude_mask(rows).tolist() == [[False, True, True, False, True, True, False, False]]
    pruned = prune_magnitude(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    assert obeys(pruned, 1) == (True, 0)
    assert obeys(np.ones((4, 8)), 1) == (False, 8)
    assert obeys(np.ones((4, 6)), 1)[0] is False  # not whole groups


def test_compressed_bytes_count_half_the_values_and_two_bit_indices():
    assert compressed_bytes(np.zeros((64, 64), np.float32)) == 64 * 64 // 2 * 4 + 64 * 64 // 8
    assert compressed_bytes(np.zeros((64, 64), np.int8)) == 64 * 64 // 2 + 64 * 64 // 8


def test_reconstruction_keeps_outputs_closer_than_magnitude_on_correlated_inputs():
    rng = np.random.default_rng(0)
    features = 64
    x = rng.standard_normal((2048, features)) @ (np.eye(features) + 0.4 * rng.standard_normal((features, features)))
    w = rng.standard_normal((32, features)).astype(np.float32)
    gram = (x.T @ x).astype(np.float32)
    magnitude, rebuilt = prune_magnitude(w), prune_reconstruct(w, gram)
    assert obeys(rebuilt, 1) == (True, 0)

    def real_error(pruned):  # measured on the data itself, not through the Gram matrix
        return np.linalg.norm(x @ (w - pruned).T) ** 2 / np.linalg.norm(x @ w.T) ** 2

    assert real_error(rebuilt) < 0.8 * real_error(magnitude)
    assert output_error(w, rebuilt, gram) == pytest.approx(real_error(rebuilt), rel=1e-3)


def test_permutation_search_is_deterministic_and_keeps_more():
    magnitudes = np.abs(np.random.default_rng(1).standard_normal((96, 64)))
    perm = search_permutation(magnitudes, seed=3)
    assert sorted(perm.tolist()) == list(range(64))
    assert np.array_equal(perm, search_permutation(magnitudes, seed=3))
    before = kept_share(magnitudes, 1)
    assert kept_share(magnitudes[:, perm], 1) > before + 0.005


def test_checker_reads_annotations_and_finds_a_broken_weight(tmp_path):
    good = prune_magnitude(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    bad = np.ones((8, 16), np.float32)
    inits = []
    for name, array in (("good", good), ("bad", bad)):
        tensor = numpy_helper.from_array(array, name)
        tensor.metadata_props.add(key=KEY, value="2:4")
        tensor.metadata_props.add(key="edgeq.sparsity.axis", value="1")
        inits.append(tensor)
    nodes = [helper.make_node("MatMul", ["x", "good"], ["y"], name="a"),
             helper.make_node("Add", ["y", "bad"], ["z"], name="b")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, [8, 16])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = check_model(path)
    assert result.weights == 2 and not result.ok
    assert result.violations == [{"weight": "bad", "axis": 1, "bad_groups": 32}]


# layer views and the Gram pass ------------------------------------------------------------------------
@pytest.mark.parametrize("op,shape,attrs", [("Conv", (6, 8, 3, 3), {}), ("MatMul", (8, 6), {}),
                                            ("Gemm", (6, 8), {"transB": 1}), ("Gemm", (8, 6), {})])
def test_layer_rows_are_outputs_by_kernel_then_input_channels(op, shape, attrs):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    node = ir.Node("", op, [ir.Value(name="x"), ir.Value(name="w", const_value=ir.tensor(w))],
                   attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()])
    layer = layer_view(node)
    rows = layer.rows()
    assert rows.shape == (6, w.size // 6)
    assert layer.in_channels == 8 and layer.out_channels == 6
    assert np.array_equal(layer.from_rows(rows), w)
    if op == "Conv":  # feature (kh, kw, c) → w[:, c, kh, kw]
        assert rows[2, (1 * 3 + 2) * 8 + 5] == w[2, 5, 1, 2]


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 0, 2, 1], "strides": [2, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
def test_conv_patches_times_weight_rows_is_the_convolution(attrs):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                       [numpy_helper.from_array(w, "w")])
    (expected,) = _run(model, {"x": x})
    conv = next(iter(ir.from_proto(model).graph))
    layer = layer_view(conv)
    patches = conv_patches(x, conv_geometry(layer, 2), np.arange)
    got = (patches @ layer.rows().T).reshape(2, *expected.shape[2:], 5)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), expected, rtol=1e-4, atol=1e-4)


def _chain_model(seed=0) -> onnx.ModelProto:
    """Conv → Relu → MaxPool → Mul(per channel) → Conv, and MatMul → Add(bias) → Gelu(erf) → MatMul."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, (16, 4, 3, 3), "w1"), _init(rng, (16,), "b1"), _init(rng, (1, 16, 1, 1), "s1", 1.0),
             _init(rng, (32, 16, 3, 3), "w2"), _init(rng, (10, 32), "m1"), _init(rng, (32,), "mb"),
             _init(rng, (32, 16), "m2"),
             numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Mul", ["p1", "s1"], ["m"], name="scale1"),
        helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["t", "m1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "mb"], ["hb"], name="fc1_bias"),
        helper.make_node("Div", ["hb", "sqrt2"], ["g1"], name="gelu_div"),
        helper.make_node("Erf", ["g1"], ["g2"], name="gelu_erf"),
        helper.make_node("Add", ["g2", "one"], ["g3"], name="gelu_add"),
        helper.make_node("Mul", ["hb", "g3"], ["g4"], name="gelu_mul"),
        helper.make_node("Mul", ["g4", "half"], ["g5"], name="gelu_half"),
        helper.make_node("MatMul", ["g5", "m2"], ["z"], name="fc2"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
                              helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 5, 10])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 4, 4]),
                       helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5, 16])], inits)


def test_channel_permutation_keeps_the_function_and_more_magnitude():
    proto = _chain_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32),
             "t": np.random.default_rng(2).standard_normal((1, 5, 10)).astype(np.float32)}
    before = _run(proto, feeds)
    model = ir.from_proto(proto)
    permute = PermuteChannelsPass({"conv2", "fc2"})
    permute(model)
    assert permute.kept["conv2"]["permuted"] and permute.kept["fc2"]["permuted"], permute.kept
    for name in ("conv2", "fc2"):
        assert permute.kept[name]["kept_after"] > permute.kept[name]["kept_before"]
    for expected, got in zip(before, _run(model, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_channel_permutation_refuses_a_region_read_elsewhere():
    proto = _chain_model()
    proto.graph.output.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, [1, 16, 8, 8]))
    model = ir.from_proto(proto)
    permute = PermuteChannelsPass({"conv2"})
    permute(model)
    assert permute.kept["conv2"] == {"permuted": False, "reason": "r1 is a graph output"}


def test_eligibility_reasons_follow_the_target_rules():
    model = ir.from_proto(_chain_model())
    layers = eligible_layers(model, RULES)
    assert layers["conv1"] == "4 input channels < 8"
    assert layers["fc1"] == "10 input channels not a multiple of 4"
    assert {layer.node.name for layer in prunable(model, RULES)} == {"conv2", "fc2"}
    model.graph.node("conv2").meta[EXCLUDE_KEY] = "excluded by the user"
    assert eligible_layers(model, RULES)["conv2"] == "excluded by the user"
    strict = SparsityRules(patterns=("2:4",), ops=("Conv",), min_out_channels=20)
    assert eligible_layers(model, strict)["fc2"] == "the target has no 2:4 kernel for MatMul"
    assert eligible_layers(model, strict)["conv1"] == "16 output channels < 20"


def test_prune_pass_annotates_and_survives_save_and_load(tmp_path):
    proto = _chain_model()
    model = ir.from_proto(proto)
    rng = np.random.default_rng(0)
    feeds_dir = tmp_path / "feeds"
    feeds_dir.mkdir()
    for i in range(8):
        np.savez(feeds_dir / f"f{i}.npz", x=rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
                 t=rng.standard_normal((1, 5, 10)).astype(np.float32))
    data = CalibrationData.from_path(feeds_dir, input_specs(model))
    inputs = LayerInputsPass(data, prunable(model, RULES))
    inputs(model)
    assert inputs.grams["conv2"].shape == (16 * 9, 16 * 9) and inputs.grams["fc2"].shape == (32, 32)
    prune = Sparsify24Pass(RULES, inputs.grams, keep_dense={"fc2"})
    prune(model)
    assert prune.layers["conv2"]["pruned"] and prune.layers["conv2"]["error"] < prune.layers["conv2"]["magnitude_error"]
    assert prune.layers["fc2"] == prune.layers["fc2"] | {"eligible": True, "pruned": False}
    path = save_model(model, tmp_path / "sparse.onnx")
    assert load_model(path).metadata_props[KEY] == "2:4"
    check = check_model(path)
    assert check.ok and check.weights == 1


# the compile, end to end --------------------------------------------------------------------------------
def _compile(tmp_path, example: str, *extra: str) -> tuple[int, dict]:
    folder = EXAMPLES / example
    out = tmp_path / f"out-{example}"
    result = CliRunner().invoke(main, [
        "compile", str(folder / "model.onnx"), "-t", "jetson-orin", "--calib", str(folder / "calib.npz"),
        "--eval", str(folder / "eval.npz"), "--metric", str(EXAMPLES / "metric.py") + ":accuracy",
        "--sparsity", "2:4", "--json", "-o", str(out), *extra])
    assert result.exit_code in (0, 3), result.output
    return result.exit_code, json.loads(result.output)


@pytest.mark.parametrize("example,eligible", [("digits_cnn", 3), ("digits_transformer", 8)])
def test_digits_models_stay_within_a_point_with_every_eligible_layer_2_4_and_int8(tmp_path, example, eligible):
    _, manifest = _compile(tmp_path, example)
    sparsity = manifest["sparsity"]
    assert sparsity["eligible"] == eligible and sparsity["pruned"] == eligible
    assert manifest["delivered"]["precision"] == "int8"
    if "caveat" in manifest["fidelity"]:  # a CPU without VNNI saturates the target's full-range int8 products
        assert "no VNNI" in manifest["fidelity"]["caveat"]
    else:
        assert manifest["fidelity"]["metric"]["drop"] <= 0.01
    # the pattern holds in the final int8 artifact, checked again from the file
    check = check_model(tmp_path / f"out-{example}" / "model.onnx")
    assert check.ok and check.weights == eligible
    assert sparsity["check"]["ok"] and 0.6 < sparsity["check"]["bytes_ratio"] < 0.65  # int8: 1/2 + 1/8
    assert "--sparsity=enable" in manifest["deploy"]["trtexec"]
    assert manifest["deploy"]["onnxruntime"]["provider_options"]["TensorrtExecutionProvider"]["trt_sparsity_enable"]


def test_a_tight_budget_leaves_the_most_sensitive_layers_dense(tmp_path):
    _, manifest = _compile(tmp_path, "digits_transformer", "--sparsity-method", "magnitude", "--max-drop", "1%")
    sparsity = manifest["sparsity"]
    kinds = [t["label"] for t in sparsity["search"]]
    assert kinds[0] == "all" and sparsity["search"][0]["drop"] > 0.005  # magnitude alone misses half the budget
    assert kinds.count("alone") == sparsity["eligible"] and "prefix" in kinds
    assert 0 < sparsity["pruned"] < sparsity["eligible"]
    dense = [n for n, layer in sparsity["layers"].items() if layer["eligible"] and not layer["pruned"]]
    assert all(sparsity["layers"][n]["reason"].startswith("kept dense") for n in dense)
    chosen = [t for t in sparsity["search"] if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["pruned"] == sparsity["pruned"] and chosen[0]["drop"] <= 0.005


def test_2_4_on_a_target_without_sparse_kernels_is_refused(tmp_path, conv_onnx, conv_feeds):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(conv_onnx), "-t", "x86-64", "--calib", str(conv_feeds),
                                       "--sparsity", "2:4", "-o", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [(
        "error: target x86-64 has no 2:4 sparse kernels (pruned weights would run as dense and only lose "
        "accuracy); use a target with a [sparsity] section, e.g. jetson-orin or gpu-ampere")]
    assert not out.exists()


def test_2_4_weights_in_the_input_model_are_checked_in_the_int8_artifact(tmp_path):
    folder = EXAMPLES / "digits_cnn"
    model = load_model(folder / "model.onnx")
    prune = Sparsify24Pass(RULES, {}, method="magnitude")
    prune(model)
    assert prune.pruned == 4
    source = save_model(model, tmp_path / "pruned.onnx")
    result = CliRunner().invoke(main, ["compile", str(source), "-t", HOST_X86, "--calib",
                                       str(folder / "calib.npz"), "--no-measure", "--json", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["delivered"]["precision"] == "int8"
    assert manifest["sparsity"]["check"]["ok"] and manifest["sparsity"]["check"]["weights"] == 4

