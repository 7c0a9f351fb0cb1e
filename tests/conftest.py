"""Shared fixtures: tiny models built with onnx.helper, feed folders, and the bundled examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.target import host_x86_target

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Latency, and int8 numerics on x86 without VNNI (8-bit weight products saturate there), depend on the CPU.
HOST_X86 = host_x86_target()


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def conv_model(channels: int = 16, size: int = 16, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[1,3,H,W] → Conv+Relu → MaxPool → Conv → Add(residual) → Relu → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.1, "w2"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(rng.standard_normal((10, c)).astype(np.float32) * 0.3, "wf"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32) * 0.1, "bf"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g1"], name="gap"),
        helper.make_node("Flatten", ["g1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits, opset)


def write_feeds(folder: Path, name: str, shape, count: int, seed: int = 0, extras=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        arrays = {name: rng.standard_normal(shape).astype(np.float32)}
        arrays.update(extras or {})
        np.savez(folder / f"feed_{i:04d}.npz", **arrays)
    return folder


@pytest.fixture
def conv_onnx(tmp_path) -> Path:
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), path)
    return path


@pytest.fixture
def conv_feeds(tmp_path) -> Path:
    return write_feeds(tmp_path / "feeds", "x", (1, 3, 16, 16), 24)


def half_model():
    """A float16 CNN as half-precision exports write it: float16 weights, input and output, a float16 Constant,
    a ConstantOfShape of float16, and a Cast to float16 inside."""
    H, rng = TensorProto.FLOAT16, np.random.default_rng(0)
    half = {name: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float16), name)
            for name, shape in (("w1", [8, 3, 3, 3]), ("b1", [8]), ("w2", [8, 8, 3, 3]), ("fc", [8, 4]))}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float16))),
             helper.make_node("Mul", ["c2", "half"], ["m"]),
             helper.make_node("Shape", ["m"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                              value=numpy_helper.from_array(np.array([1.0], np.float16))),
             helper.make_node("Add", ["m", "ones"], ["a"]),
             helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["a32"], ["r2"]),
             helper.make_node("Cast", ["r2"], ["r2h"], to=H),
             helper.make_node("GlobalAveragePool", ["r2h"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", H, [1, 3, 16, 16])],
                      [helper.make_tensor_value_info("y", H, [1, 4])], list(half.values()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))
