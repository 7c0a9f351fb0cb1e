"""The opset converter: every op whose signature changes between opsets 7 and 21, at each boundary a model may
cross (≤ 11 → 13, 13 → 18, 17 → 21), converted and run in ONNX Runtime beside the unconverted model."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeq.cli import main
from edgeq.errors import UserError
from edgeq.passes.convert_opset import ConvertOpsetPass, default_opset

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _model(node, inputs, outputs, opset, inits=()):
    graph = helper.make_graph([node], "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _info(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def _case(op, opset, x_shape, out_shapes, extra_inputs=(), inits=(), x_dtype=F, **attrs):
    """One ``op`` node reading x; outputs typed by ONNX's shape inference where ``out_shapes`` leaves them None
    (a shape, or a (shape, dtype) pair)."""
    names = [f"y{i}" for i in range(len(out_shapes))]
    node = helper.make_node(op, ["x", *extra_inputs], names, name=f"{op.lower()}_node", **attrs)
    outs = [_info(n, *s) if isinstance(s, tuple) else _info(n, s) for n, s in zip(names, out_shapes)]
    return onnx.shape_inference.infer_shapes(_model(node, [_info("x", x_shape, x_dtype)], outs, opset, inits))


def _ints(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _floats(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


X4 = [1, 3, 4, 6]
CASES = {
    # ≤ 11 → 13: attributes that became inputs, removed ops, flattening softmax
    "Slice 9": (_case("Slice", 9, X4, [None], starts=[0, 1], ends=[2, 5], axes=[1, 3]), 13),
    "TopK 9": (_case("TopK", 9, [2, 8], [[2, 3], ([2, 3], TensorProto.INT64)], k=3), 13),
    "Upsample 7 nearest": (_case("Upsample", 7, X4, [None], mode="nearest", scales=[1.0, 1.0, 2.0, 3.0]), 13),
    "Upsample 7 linear": (_case("Upsample", 7, X4, [None], mode="linear", scales=[1.0, 1.0, 2.0, 2.0]), 13),
    "Upsample 9": (_case("Upsample", 9, X4, [None], ["s"], [_floats("s", [1, 1, 2, 2])], mode="nearest"), 13),
    "Resize 10 nearest": (_case("Resize", 10, X4, [None], ["s"], [_floats("s", [1, 1, 1.5, 2])], mode="nearest"), 13),
    "Resize 10 linear": (_case("Resize", 10, X4, [None], ["s"], [_floats("s", [1, 1, 2, 1.5])], mode="linear"), 13),
    "Clip 10": (_case("Clip", 10, X4, [None], min=-0.5, max=0.7), 13),
    "Clip 10 max only": (_case("Clip", 10, X4, [None], max=0.2), 13),
    "Pad 10 constant": (_case("Pad", 10, X4, [None], pads=[0, 0, 1, 2, 0, 1, 0, 1], value=0.5), 13),
    "Pad 10 reflect": (_case("Pad", 10, X4, [None], mode="reflect", pads=[0, 0, 1, 1, 0, 0, 1, 1]), 13),
    "Dropout 11": (_case("Dropout", 11, X4, [None], ratio=0.3), 13),
    "Scatter 9": (_case("Scatter", 9, [3, 4], [None], ["i", "u"],
                        [_ints("i", [[1, 0, 2, 3]]), _floats("u", [[9, 8, 7, 6]])], axis=1), 13),
    "BatchNormalization 7": (_case("BatchNormalization", 7, X4, [None], ["s", "b", "m", "v"],
                                   [_floats(n, RNG.random(3) + 0.5) for n in "sbmv"], spatial=1), 13),
    "Squeeze 11": (_case("Squeeze", 11, [1, 3, 1, 5], [None], axes=[0, 2]), 13),
    "Unsqueeze 11": (_case("Unsqueeze", 11, [3, 5], [None], axes=[0, 3]), 13),
    "ReduceSum 11": (_case("ReduceSum", 11, X4, [None], axes=[1, 3], keepdims=0), 13),
    "Split 11 sizes": (_case("Split", 11, [2, 7], [None, None], axis=1, split=[3, 4]), 13),
    "Split 11 equal": (_case("Split", 11, [2, 6], [None, None, None], axis=1), 13),
    "Softmax 11 axis 1 of 4-D": (_case("Softmax", 11, X4, [None]), 13),
    "Softmax 11 last axis": (_case("Softmax", 11, X4, [None], axis=3), 13),
    "LogSoftmax 11 axis 2": (_case("LogSoftmax", 11, X4, [None], axis=2), 13),
    "Hardmax 11 axis 1": (_case("Hardmax", 11, X4, [None], axis=1), 13),
    "Softmax 11 to 18": (_case("Softmax", 11, [2, 3, 5], [None], axis=-2), 18),
    # 13 → 18: the ReduceX axes attribute became an input; Split needs num_outputs
    **{f"{op} 13": (_case(op, 13, X4, [None], axes=[2, 3], keepdims=1), 18)
       for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                  "ReduceLogSumExp", "ReduceSumSquare")},
    "Split 13 equal": (_case("Split", 13, [2, 6], [None, None], axis=1), 18),
    "Split 13 sizes": (_case("Split", 13, [2, 7], [None, None], ["s"], [_ints("s", [5, 2])], axis=1), 18),
    "RoiAlign 10": (_case("RoiAlign", 10, [1, 2, 8, 8], [None], ["rois", "idx"],
                          [_floats("rois", [[0.5, 1.0, 6.0, 5.5]]), _ints("idx", [0])],
                          output_height=3, output_width=2, sampling_ratio=2), 18),
    # 17 → 21: the same moves at 18, then onnxscript's adapters (GroupNormalization at 21, GridSample at 20)
    "ReduceMean 17": (_case("ReduceMean", 17, X4, [None], axes=[-1], keepdims=0), 21),
    "ReduceMax 17": (_case("ReduceMax", 17, X4, [None], axes=[1]), 21),
    "Split 17": (_case("Split", 17, [2, 6], [None, None, None], axis=-1), 21),
    "Squeeze 17": (_case("Squeeze", 17, [1, 3, 1, 5], [None], ["a"], [_ints("a", [2])]), 21),
    "Clip 17": (_case("Clip", 17, X4, [None], ["lo", "hi"], [_floats("lo", -0.1), _floats("hi", 0.4)]), 21),
    "GroupNormalization 18": (_case("GroupNormalization", 18, [1, 4, 3, 3], [[1, 4, 3, 3]], ["s", "b"],
                                    [_floats("s", [1.0, 2.0]), _floats("b", [0.1, -0.2])], num_groups=2), 21),
    "DFT 17": (_case("DFT", 17, [1, 8, 1], [[1, 8, 2]], axis=1), 21),
    "GridSample 16": (_case("GridSample", 16, [1, 2, 5, 5], [None], ["grid"],
                            [_floats("grid", RNG.uniform(-1, 1, (1, 3, 4, 2)))], mode="bilinear"), 21),
}


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})


@pytest.mark.parametrize("case", list(CASES))
def test_converted_op_computes_what_the_original_computed(case):
    proto, target = CASES[case]
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = RNG.standard_normal(shape).astype(np.float32)
    model = ir.from_proto(proto)
    ConvertOpsetPass(target)(model)
    assert default_opset(model) == target
    converted = ir.to_proto(model)
    onnx.checker.check_model(converted, full_check=True)  # valid at the new opset, attribute by attribute
    expected, got = _run(proto, x), _run(converted, x)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_subgraph_nodes_are_converted_too():
    """A Squeeze with an axes attribute inside an If branch (opset 11) becomes a valid opset-13 Squeeze."""
    branch = lambda name: helper.make_graph(
        [helper.make_node("Squeeze", ["x"], [f"{name}_y"], axes=[0], name=f"{name}_squeeze")], name, [],
        [_info(f"{name}_y", [3])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="if")
    graph = helper.make_graph([node], "g", [_info("c", [], TensorProto.BOOL), _info("x", [1, 3])], [_info("y", [3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    model = ir.from_proto(proto)
    ConvertOpsetPass(13)(model)
    converted = ir.to_proto(model)
    onnx.checker.check_model(converted, full_check=True)
    x = RNG.standard_normal((1, 3)).astype(np.float32)
    for cond in (True, False):
        feeds = {"c": np.array(cond), "x": x}
        run = lambda p: ort.InferenceSession(p.SerializeToString()).run(None, feeds)[0]
        np.testing.assert_array_equal(run(converted), run(proto))


def test_down_only_by_relabelling_and_prehistoric_opsets_are_refused():
    """Down where no op changed in between (ReduceMean 17 → 13: the same schema); a ReduceMean at 18 reads its
    axes as an input, which 17 cannot say: refused, naming it."""
    model = ir.from_proto(CASES["ReduceMean 17"][0])
    ConvertOpsetPass(13)(model)
    assert default_opset(model) == 13
    ConvertOpsetPass(18)(model)
    with pytest.raises(UserError, match=r"\(ReduceMean\) changed after opset 17"):
        ConvertOpsetPass(17)(model)
    old = _case("Relu", 6, [2], [None])
    with pytest.raises(UserError, match="older than 7"):
        ConvertOpsetPass(13)(ir.from_proto(old))
    body = helper.make_graph([helper.make_node("Add", ["s_in", "x_t"], ["s_out"])], "body",
                             [_info("s_in", [2]), _info("x_t", [2])], [_info("s_out", [2])])
    scan = helper.make_node("Scan", ["", "s0", "xs"], ["s_last"], body=body, num_scan_inputs=1, name="scan8")
    graph = helper.make_graph([scan], "g", [_info("s0", [1, 2]), _info("xs", [1, 3, 2])], [_info("s_last", [1, 2])])
    with pytest.raises(UserError, match="opset-8 Scan"):
        ConvertOpsetPass(13)(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])))


def test_a_model_importing_no_default_domain_gets_the_target(tmp_path):
    """onnxmltools writes an XGBoost classifier as one ai.onnx.ml node with no default-domain import: it was
    read as opset 1 and refused; it imports the target now, compiles, and runs as before."""
    scaler = helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[0.5] * 3, scale=[2.0] * 3,
                              name="scale")
    proto = helper.make_model(helper.make_graph([scaler], "g", [_info("x", [None, 3])], [_info("y", [None, 3])]),
                              opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    model = ir.from_proto(proto)
    ConvertOpsetPass(13)(model)
    assert model.opset_imports == {"ai.onnx.ml": 1, "": 13}
    path = tmp_path / "ml_only.onnx"
    onnx.save(proto, path)
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(6):
        np.savez(feeds / f"{i}.npz", x=RNG.standard_normal((4, 3)).astype(np.float32))
    result = CliRunner().invoke(main, ["compile", str(path), "-t", "x86-64", "--calib", str(feeds),
                                       "-o", str(tmp_path / "out"), "--no-measure"])
    assert result.exit_code == 0, result.output
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p)).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(tmp_path / "out" / "model.onnx"), run(path), rtol=1e-6)


def test_a_model_newer_than_the_runtime_compiles_through_a_relabelled_copy(tmp_path):
    """onnx 1.23 writes IR version 14 and opset 28 by default; ONNX Runtime 1.31 reads IR 13 and opset 26.
    Opset 28 widened Celu's types and nothing else: the model compiles, checked against a relabelled copy."""
    from conftest import write_feeds
    node = helper.make_node("Celu", ["x"], ["y"], alpha=0.5)
    graph = helper.make_graph([node], "g", [_info("x", [1, 8])], [_info("y", [1, 8])])
    path = tmp_path / "new.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 28)], ir_version=14), path)
    with pytest.raises(Exception, match="Unsupported model IR version"):
        ort.InferenceSession(str(path))
    feeds = write_feeds(tmp_path / "feeds", "x", (1, 8), 6)
    result = CliRunner().invoke(main, ["compile", str(path), "-t", "x86-64", "--calib", str(feeds),
                                       "-o", str(tmp_path / "out"), "--no-measure"])
    assert result.exit_code == 0, result.output
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert out.ir_version <= 13 and default_opset(ir.from_proto(out)) <= 26
