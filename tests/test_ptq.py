"""Post-training techniques: reconstructed weight rounding (GPTQ) and bias correction, each end to end through
``edgeq compile`` on real data (scikit-learn's digits), judged on held-out feeds in ONNX Runtime."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

from conftest import HOST_X86, make_model
from edgeq.cli import main
from edgeq.model_io import load_model
from edgeq.passes.insert_qdq import InsertQDQPass, constant_dequantize

DIGITS = load_digits()


def _mlp(tmp_path):
    """digits [1, 64] (pixel values 0…16: inputs with a large mean) → MatMul+Add → Relu → MatMul+Add → logits;
    the second layer fitted by least squares to the labels, so the logits mean something."""
    rng = np.random.default_rng(0)
    x = DIGITS.data.astype(np.float32)
    w1 = (rng.standard_normal((64, 96)) * 0.05).astype(np.float32)
    b1 = (rng.standard_normal(96) * 0.1).astype(np.float32)
    hidden = np.maximum(x @ w1 + b1, 0)
    w2 = np.linalg.lstsq(np.c_[hidden, np.ones(len(x))], np.eye(10)[DIGITS.target], rcond=None)[0]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    inits = [numpy_helper.from_array(a.astype(np.float32), n)
             for n, a in (("w1", w1), ("b1", b1), ("w2", w2[:-1]), ("b2", w2[-1]))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return _save(tmp_path, model, x)


def _depthwise(tmp_path):
    """digits as 8×8 images, 8 shifted copies as channels → depthwise 3×3 Conv (bias) → Relu → 1×1 Conv."""
    rng = np.random.default_rng(1)
    images = DIGITS.data.reshape(-1, 1, 8, 8).astype(np.float32)
    x = np.concatenate([images + c for c in range(8)], axis=1)  # channel means 4…11
    dw = (rng.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32)
    pw = (rng.standard_normal((16, 8, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "dw", "dwb"], ["d"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "pw", "pwb"], ["y"], name="pointwise")]
    inits = [numpy_helper.from_array(dw, "dw"), numpy_helper.from_array(np.full(8, 0.5, np.float32), "dwb"),
             numpy_helper.from_array(pw, "pw"), numpy_helper.from_array(np.full(16, 0.1, np.float32), "pwb")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    return _save(tmp_path, model, x)


def _save(tmp_path, model, samples):
    """The model, stacked calibration and evaluation feeds, and 200 held-out feeds neither sees."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    for name, part in (("calib", samples[:300]), ("eval", samples[1000:1300])):
        np.savez(tmp_path / f"{name}.npz", x=part)
    return path, samples[1300:1500, None]


def _compile(tmp_path, model, ptq, *extra):
    out = tmp_path / f"out-{ptq}"
    result = CliRunner().invoke(main, ["compile", str(model), "-t", HOST_X86, "--calib", str(tmp_path / "calib.npz"),
                                       "--eval", str(tmp_path / "eval.npz"), "--no-measure", "--no-guard",
                                       "--ptq", ptq, *extra, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "manifest.json").read_text())


def _errors(float_model, quantized, held_out):
    """Per feed, the quantized output minus float's, on feeds neither calibration nor evaluation saw."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (float_model, quantized)]
    return np.stack([sessions[1].run(None, {"x": x})[0] - sessions[0].run(None, {"x": x})[0] for x in held_out])


def _sqnr(float_model, quantized, held_out):
    session = ort.InferenceSession(str(float_model), providers=["CPUExecutionProvider"])
    signal = np.stack([session.run(None, {"x": x})[0] for x in held_out])
    return 10 * np.log10(np.sum(signal ** 2) / np.sum(_errors(float_model, quantized, held_out) ** 2))


def _weights(path):
    found = {}
    for node in load_model(path).graph:
        weight = constant_dequantize(node.inputs[1]) if node.op_type in ("Conv", "MatMul") else None
        if weight is not None:
            found[node.name] = (weight.integers.const_value.numpy(), weight.scale)
    return found


def test_gptq_rounding_lowers_the_error_on_unseen_data_and_keeps_the_grid(tmp_path):
    model, held_out = _mlp(tmp_path)
    nearest, _ = _compile(tmp_path, model, "none")
    gptq, manifest = _compile(tmp_path, model, "gptq")
    layers = manifest["ptq"]["gptq"]
    assert set(layers) == {"fc1", "fc2"} and all(v["error"] < v["nearest_error"] for v in layers.values())
    assert _sqnr(model, gptq / "model.onnx", held_out) > _sqnr(model, nearest / "model.onnx", held_out) + 1.0
    before, after = _weights(nearest / "model.onnx"), _weights(gptq / "model.onnx")
    for name, (q, scale) in after.items():
        np.testing.assert_array_equal(scale, before[name][1])  # the same grid, other grid points
        assert np.abs(q).max() <= 127 and (q != before[name][0]).any()


@pytest.mark.parametrize("make", [_mlp, _depthwise], ids=["matmul-add", "depthwise-conv"])
def test_bias_correction_removes_the_mean_output_error(tmp_path, make):
    model, held_out = make(tmp_path)
    plain, _ = _compile(tmp_path, model, "none")
    corrected, manifest = _compile(tmp_path, model, "bias-correction")
    layers = manifest["ptq"]["bias_correction"]
    assert layers and all(v["applied"] for v in layers.values())
    axes = (0, 1) if make is _mlp else (0, 1, 3, 4)  # the mean error per output channel
    bias_before = np.abs(_errors(model, plain / "model.onnx", held_out).mean(axis=axes))
    bias_after = np.abs(_errors(model, corrected / "model.onnx", held_out).mean(axis=axes))
    assert bias_after.mean() < 0.7 * bias_before.mean()


def test_layers_kept_float_are_not_touched(tmp_path):
    model, _ = _mlp(tmp_path)
    out, manifest = _compile(tmp_path, model, "gptq,bias-correction", "--exclude", "name:fc2")
    assert set(manifest["ptq"]["gptq"]) == {"fc1"} and set(manifest["ptq"]["bias_correction"]) == {"fc1"}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(model).graph.initializer}
    delivered = {i.name: numpy_helper.to_array(i) for i in onnx.load(out / "model.onnx").graph.initializer}
    np.testing.assert_array_equal(delivered["w2"], original["w2"])
    np.testing.assert_array_equal(delivered["b2"], original["b2"])
    assert not np.array_equal(delivered["b1"], original["b1"])  # fc1's bias carries the correction


def test_an_unknown_technique_is_one_line(tmp_path):
    model, _ = _mlp(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(model), "-t", HOST_X86, "--calib", str(tmp_path / "calib.npz"),
                                       "--ptq", "adaround", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown --ptq technique 'adaround'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _pre_ln(tmp_path, decomposed=False, residual=False):
    """16 digits per feed as tokens [1, 16, 64] → LayerNorm whose γ makes 3 channels 60× the rest (the outlier
    channels of real transformer encoders; a per-tensor int8 scale then leaves the others a few levels) →
    MatMul → y [; + residual: post-LN, not smoothable]."""
    rng = np.random.default_rng(2)
    gamma = np.ones(64, np.float32)
    gamma[[3, 17, 40]] = 60.0
    beta = (rng.standard_normal(64) * 0.1).astype(np.float32)
    w = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)
    w[[3, 17, 40]] /= 60.0  # the outliers reach the output no more than the other channels do
    if decomposed:  # an old exporter's LayerNorm: …normalized → Mul γ → Add β
        nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], name="mean"),
                 helper.make_node("Sub", ["x", "mu"], ["c"], name="center"),
                 helper.make_node("Mul", ["c", "c"], ["c2"], name="square"),
                 helper.make_node("ReduceMean", ["c2"], ["var"], axes=[-1], name="variance"),
                 helper.make_node("Add", ["var", "eps"], ["ve"], name="plus_eps"),
                 helper.make_node("Sqrt", ["ve"], ["sd"], name="sd"),
                 helper.make_node("Div", ["c", "sd"], ["n"], name="normalize"),
                 helper.make_node("Mul", ["n", "gamma"], ["g"], name="scale"),
                 helper.make_node("Add", ["g", "beta"], ["ln"], name="shift")]
        opset = 17
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln")]
        opset = 17
    nodes.append(helper.make_node("MatMul", ["ln", "w"], ["y0" if residual else "y"], name="proj"))
    if residual:
        nodes.append(helper.make_node("Add", ["y0", "ln"], ["y"], name="residual"))
    inits = [numpy_helper.from_array(a, n) for n, a in (("gamma", gamma), ("beta", beta), ("w", w))]
    inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), "eps"))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64])], inits, opset=opset)
    tokens = DIGITS.data[:1792].astype(np.float32).reshape(-1, 16, 64)  # 112 feeds
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=tokens[:40])
    np.savez(tmp_path / "eval.npz", x=tokens[40:70])
    return path, tokens[70:, None]


@pytest.mark.parametrize("decomposed,residual", [(False, False), (True, False), (False, True)],
                         ids=["LayerNormalization", "decomposed", "post-LN"])
def test_smoothquant_moves_outlier_channels_into_the_weights(tmp_path, decomposed, residual):
    model, held_out = _pre_ln(tmp_path, decomposed, residual)
    plain, _ = _compile(tmp_path, model, "none", "--optional-ops", "none")
    smoothed, manifest = _compile(tmp_path, model, "smoothquant", "--optional-ops", "none")
    (site,) = manifest["ptq"]["smoothquant"].values()
    assert site["layers"] == ["proj"] and site["alpha"] > 0 and site["error"] < site["error_unsmoothed"]
    assert site["into"] == ("Mul" if residual else "LayerNorm")  # the residual Add still reads the LayerNorm
    assert _sqnr(model, smoothed / "model.onnx", held_out) > _sqnr(model, plain / "model.onnx", held_out) + 6.0


def test_smoothquant_acts_only_where_it_predicts_a_gain(tmp_path):
    """The MLP's pixels are ordinary (α = 0: nothing moves); its Relu output has a few dominant hidden units,
    and a Mul by 1/s in front of fc2 (the Relu's output cannot absorb it) pays on unseen data."""
    model, held_out = _mlp(tmp_path)
    plain, _ = _compile(tmp_path, model, "none")
    out, manifest = _compile(tmp_path, model, "smoothquant")
    sites = manifest["ptq"]["smoothquant"]
    assert sites["x"]["alpha"] == 0.0 and "into" not in sites["x"]
    assert sites["h"]["into"] == "Mul" and sites["h"]["error"] < 0.5 * sites["h"]["error_unsmoothed"]
    nodes = onnx.load(out / "model.onnx").graph.node
    assert [n.input[0] for n in nodes if n.op_type == "Mul"] == ["h"]
    assert _sqnr(model, out / "model.onnx", held_out) > _sqnr(model, plain / "model.onnx", held_out) + 6.0


def test_non_finite_layer_inputs_leave_the_layer_as_it_was(tmp_path):
    """Log of a zero power is −inf: a layer reading it keeps nearest rounding and its bias, and the compile
    still succeeds (the Gram matrix of such inputs cannot be factored)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 8)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Log", ["x"], ["l"], name="log"),
             helper.make_node("MatMul", ["l", "w"], ["y0"], name="fc"),
             helper.make_node("Add", ["y0", "b"], ["y"], name="fc_bias")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                       [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(8, np.float32), "b")])
    samples = np.abs(rng.standard_normal((1500, 16))).astype(np.float32)
    samples[::7, 0] = 0.0  # some −inf
    path, _ = _save(tmp_path, model, samples)
    _, manifest = _compile(tmp_path, path, "smoothquant,gptq,bias-correction")
    assert manifest["ptq"]["gptq"]["fc"] == {"changed": False, "reason": "non-finite layer inputs"}
    assert "fc" not in manifest["ptq"]["bias_correction"] and "l" not in manifest["ptq"]["smoothquant"]


def _scaled_chain(tmp_path):
    """digits 8×8 → Conv 1→8 whose output channels differ 1000× in scale (as BatchNorm folding leaves them) →
    PRelu → depthwise 3×3 → Relu → 1×1 Conv: the per-tensor activation scale between the layers is set by the
    largest channel."""
    rng = np.random.default_rng(2)
    x = DIGITS.data.reshape(-1, 1, 8, 8).astype(np.float32)
    gain = np.logspace(-1.5, 1.5, 8).astype(np.float32)
    w1 = (rng.standard_normal((8, 1, 3, 3)) * 0.1).astype(np.float32) * gain[:, None, None, None]
    dw = (rng.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32) / gain[:, None, None, None]
    pw = (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["a", "slope"], ["p"], name="prelu"),
             helper.make_node("Conv", ["p", "dw"], ["d"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "pw"], ["y"], name="pointwise")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(gain * 0.1, "b1"),
             numpy_helper.from_array(np.full((8, 1, 1), 0.1, np.float32), "slope"),
             numpy_helper.from_array(dw, "dw"), numpy_helper.from_array(pw, "pw")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return _save(tmp_path, model, x)


def test_cross_layer_equalization_keeps_the_function_and_evens_the_channels(tmp_path):
    model, held_out = _scaled_chain(tmp_path)
    nearest, _ = _compile(tmp_path, model, "none")
    equalized, manifest = _compile(tmp_path, model, "cle")
    chains = manifest["ptq"]["cle"]
    assert set(chains) == {"conv→depthwise", "depthwise→pointwise"}
    assert chains["conv→depthwise"]["spread_after"] < chains["conv→depthwise"]["spread_before"] / 10
    assert manifest["ptq"]["function_check"]["max_relative_error"] < 1e-4  # the float model computes the same
    assert _sqnr(model, equalized / "model.onnx", held_out) > _sqnr(model, nearest / "model.onnx", held_out) + 6.0


def test_a_float_rewrite_that_changes_the_function_is_undone(tmp_path, monkeypatch):
    from edgeq.passes import equalize_layers

    def broken(self, chain):  # scales the first layer but not its readers
        equalize_layers._scale_first(chain.first, np.full(8, 2.0))
        return 0.0

    monkeypatch.setattr(equalize_layers.EqualizeLayersPass, "_equalize", broken)
    model, held_out = _scaled_chain(tmp_path)
    nearest, _ = _compile(tmp_path, model, "none")
    undone, manifest = _compile(tmp_path, model, "cle")
    assert "changed what the model computes" in manifest["ptq"]["function_check"]["undone"]
    assert _sqnr(model, undone / "model.onnx", held_out) == pytest.approx(_sqnr(model, nearest / "model.onnx", held_out))


def test_cross_layer_equalization_leaves_relu6_chains_alone():
    import onnx_ir as ir

    from edgeq.passes.equalize_layers import EqualizeLayersPass

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 1, 1, 1)).astype(np.float32) * np.array([100, 1, 1, 0.01], np.float32)[:, None, None, None]
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
             helper.make_node("Clip", ["a", "lo", "hi"], ["r"], name="relu6"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    model = ir.from_proto(make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], inits))
    equalize = EqualizeLayersPass()
    assert not equalize(model).modified and equalize.chains == {}
    np.testing.assert_array_equal(model.graph.initializers["w1"].const_value.numpy(), w1)


def test_gptq_rounds_int4_blocks_on_their_own_grid(tmp_path):
    """Weight-only int4 (the mixed-precision precision) gains most from reconstruction: 16 levels per block."""
    import onnx_ir as ir

    from edgeq.calibration_data import CalibrationData, input_specs
    from edgeq.passes.convert_opset import ConvertOpsetPass
    from edgeq.passes.layer_inputs import LayerInputsPass
    from edgeq.passes.round_weights import RoundWeightsPass
    from edgeq.passes.sparsify import layer_view
    from edgeq.target import load_target

    model_path, held_out = _mlp(tmp_path)
    rules = load_target(HOST_X86).quantization
    float_model = load_model(model_path)
    layers = {n.name: layer_view(n) for n in float_model.graph if n.op_type == "MatMul"}
    calib = CalibrationData.from_path(tmp_path / "calib.npz", input_specs(float_model))
    inputs = LayerInputsPass(calib, list(layers.values()))
    inputs(float_model)
    built = {}
    for label, gptq in (("nearest", False), ("gptq", True)):
        model = load_model(model_path)
        ConvertOpsetPass(21)(model)
        InsertQDQPass(rules, {}, precisions={"fc1": "int4", "fc2": "int4"}, int4_block_size=32)(model)
        grids = {n.name: constant_dequantize(n.inputs[1]).grid() for n in model.graph if n.op_type == "MatMul"}
        if gptq:
            rounding = RoundWeightsPass(layers, inputs.grams)
            rounding(model)
            assert all(r["changed"] and r["error"] < r["nearest_error"] for r in rounding.layers.values())
        after = {n.name: constant_dequantize(n.inputs[1]) for n in model.graph if n.op_type == "MatMul"}
        for name, weight in after.items():  # the grid is the one insert_qdq stored; integers stay 4-bit
            np.testing.assert_array_equal(weight.grid()[0], grids[name][0])
            assert weight.integers.const_value.dtype == ir.DataType.UINT4
            assert 0 <= weight.integers.const_value.numpy().astype(int).min() <= 15
        built[label] = tmp_path / f"{label}.onnx"
        ir.save(model, built[label])
    assert _sqnr(model_path, built["gptq"], held_out) > _sqnr(model_path, built["nearest"], held_out) + 1.0
