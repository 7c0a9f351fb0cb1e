"""A MaxPool that runs in int8 over non-overlapping windows becomes Reshape + ReduceMax: same integers."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import HOST_X86, conv_model, make_model, write_feeds
from edgeq.cli import main
from edgeq.passes.pool_as_reduce import PoolAsReducePass
from edgeq.search.op_sets import POOL_AS_REDUCE, op_set_candidates


def _qdq_pool(shape, opset=17, **pool):
    """x → Q → DQ → MaxPool → Q → DQ → y (uint8, one scale)."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("MaxPool", ["xd"], ["p"], name="pool", **pool),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["o1", "o2", "o3", "o4"])], inits, opset)


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("shape,window,opset", [
    ([1, 8, 6, 16], [1, 4], 17),         # frequency pooling, an audio front end
    ([1, 8, 6, 16], [2, 2], 18),         # ReduceMax reads its axes from an input
    (["n", 8, "t", 12], [1, 3], 13),     # dynamic batch and time: copied and inferred
])
def test_a_tiling_int8_maxpool_becomes_reshape_and_reducemax_with_the_same_integers(shape, window, opset):
    proto = _qdq_pool(shape, opset, kernel_shape=window, strides=window)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    rewrite = PoolAsReducePass()
    rewrite(model)
    assert rewrite.rewritten == ["pool"]
    ops = [n.op_type for n in model.graph]
    assert "MaxPool" not in ops and ops.count("ReduceMax") == 1
    assert next(n for n in model.graph if n.op_type == "ReduceMax").name == "pool"  # profiles attribute to it
    concrete = [d if isinstance(d, int) else 2 for d in shape]
    x = np.random.default_rng(0).standard_normal(concrete).astype(np.float32)
    np.testing.assert_array_equal(_run(ir.to_proto(model), x), _run(proto, x))


@pytest.mark.parametrize("pool", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),  # overlapping windows
    dict(kernel_shape=[1, 4], strides=[1, 4], ceil_mode=1),         # a partial last window
    dict(kernel_shape=[1, 5], strides=[1, 5]),                      # 16 is no multiple of 5
])
def test_a_pool_whose_windows_do_not_tile_its_input_is_left_alone(pool):
    model = ir.from_proto(onnx.shape_inference.infer_shapes(_qdq_pool([1, 8, 6, 16], **pool)))
    rewrite = PoolAsReducePass()
    rewrite(model)
    assert rewrite.rewritten == [] and [n.op_type for n in model.graph].count("MaxPool") == 1


def test_a_float_maxpool_is_left_alone():
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[1, 4], strides=[1, 4])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["o1", "o2", "o3", "o4"])], [], 17)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    rewrite = PoolAsReducePass()
    rewrite(model)
    assert rewrite.rewritten == []


def test_the_op_set_member_rewrites_the_delivered_model_and_auto_measures_it_against_its_absence(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), model)  # a 2×2, stride-2 MaxPool between two int8 convolutions
    feeds = write_feeds(tmp_path / "feeds", "x", (1, 3, 16, 16), 12)
    delivered = {}
    for ops in ("MaxPoolAsReduce", "none"):
        out = tmp_path / ops
        result = CliRunner().invoke(main, ["compile", str(model), "-t", HOST_X86, "--calib", str(feeds),
                                           "--optional-ops", ops, "--no-measure", "--no-guard", "-o", str(out)])
        assert result.exit_code == 0, result.output
        delivered[ops] = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert "ReduceMax" in delivered["MaxPoolAsReduce"] and "MaxPool" not in delivered["MaxPoolAsReduce"]
    assert "MaxPool" in delivered["none"] and "ReduceMax" not in delivered["none"]
    auto = op_set_candidates("auto", ("Add", POOL_AS_REDUCE), {"Add", POOL_AS_REDUCE})
    assert auto["all"] == ("Add", POOL_AS_REDUCE) and auto[f"all but {POOL_AS_REDUCE}"] == ("Add",)
