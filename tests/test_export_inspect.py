import json

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model
from edgeq.cli import main

FACTORY = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

def build():
    torch.manual_seed(0)
    return Net()

def not_a_module():
    return 42
'''


def test_export_checks_numerics_and_keeps_batch_dynamic(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    out = tmp_path / "net.onnx"
    result = CliRunner().invoke(main, ["export", f"{tmp_path / 'factory.py'}:build", "--input", "x:1,3,8,8",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output
    session = ort.InferenceSession(str(out))
    assert session.run(None, {"x": np.zeros((3, 3, 8, 8), np.float32)})[0].shape == (3, 4)


def test_export_bad_factory_and_bad_shape(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    runner = CliRunner()
    result = runner.invoke(main, ["export", f"{tmp_path / 'factory.py'}:not_a_module", "--input", "x:1,3,8,8",
                                  "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "not a torch.nn.Module" in result.output
    result = runner.invoke(main, ["export", f"{tmp_path / 'factory.py'}:build", "--input", "x:1,three",
                                  "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "bad --input" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_reports_constant_weights_and_subgraph_compute(tmp_path):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["b_out"], name="inner")], "b", [],
                               [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("Constant", [], ["w"], value=weight, name="const"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx"), "--json"])
    info = json.loads(result.output)
    assert info["constant_weights"] == 1 and info["parameters"] == 64 and info["subgraphs"] == 1
    assert info["coverage"]["in_subgraphs"] == 2 and info["coverage"]["quantizable_share"] == 0.0


def test_export_leaves_no_stack_traces_or_local_paths(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    out = tmp_path / "net.onnx"
    assert CliRunner().invoke(main, ["export", f"{tmp_path / 'factory.py'}:build", "--input", "x:1,3,8,8",
                                     "-o", str(out)]).exit_code == 0
    assert str(tmp_path).encode() not in out.read_bytes()
    assert not any(node.metadata_props or node.doc_string for node in onnx.load(str(out)).graph.node)
