"""ORT-format packaging (``--package ort``) and ``edgeq verify``: real conversions by ONNX Runtime's own tool."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, make_model
from edgeq.cli import main
from edgeq.runtimes import ort_format
from edgeq.target import load_target

CNN = EXAMPLES / "digits_cnn"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def packaged(out, target="x86-64", *extra):
    result = run("compile", CNN / "model.onnx", "-t", target, "--calib", CNN / "calib.npz", "--no-measure",
                 "--package", "ort", "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def x86_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "art"
    return out, packaged(out)


def test_the_ort_file_matches_the_onnx_and_its_config_lists_exactly_its_kernels(x86_artifact):
    out, manifest = x86_artifact
    package = manifest["package"]
    assert {"model.ort", "required_operators_and_types.config"} <= set(manifest["files"])
    assert package["style"] == "Fixed" and package["target_platform"] == "portable"
    assert package["ort_format_version"] == ort_format.format_version(out / "model.ort")
    config = (out / "required_operators_and_types.config").read_text()
    assert config.startswith("# Generated from model/s:\n# - model.ort\n") and "/" not in config.split("\n")[1]
    needed = ort_format.kernels_in(out / "model.ort")
    assert needed == ort_format.kernels_listed(out / "required_operators_and_types.config")
    assert ("com.microsoft", 1, "QLinearConv") in needed  # the int8 model, fused, is what was packaged
    assert package["kernels"] == [";".join(map(str, k)) for k in sorted(needed)]
    image = np.load(CNN / "eval.npz")["image"][:4]
    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["NchwcTransformer"]).run(None, {"image": image})[0]
    ort_out = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image})[0]
    assert np.max(np.abs(ort_out - onnx_out)) <= 1e-5 * np.max(np.abs(onnx_out))
    assert package["check"]["max_relative_error"] <= 1e-5 and package["check"]["feeds"] == 3


def test_an_arm_target_keeps_int8_activations_signed(tmp_path):
    package = packaged(tmp_path / "arm", "aarch64")["package"]
    assert package["target_platform"] == "arm"
    config = (tmp_path / "arm" / "required_operators_and_types.config").read_text()
    assert "int8_t" in config and "uint8_t" not in config


def test_a_graph_with_subgraphs_lists_their_kernels_too(tmp_path):
    """If branches hold their own nodes: the FlatBuffer walk and ORT's config must both see them."""
    then = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Softsign", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    model = make_model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                        helper.make_node("Greater", ["s", "zero"], ["c"]),
                        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                       [numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    onnx.save(model, tmp_path / "if.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    record = ort_format.package(tmp_path / "if.onnx", tmp_path, load_target("x86-64"), [{"x": x}, {"x": -x}])
    kernels = ort_format.kernels_in(tmp_path / "model.ort")
    assert {op for _, _, op in kernels} >= {"If", "Sigmoid", "Softsign"}
    assert kernels == ort_format.kernels_listed(tmp_path / "required_operators_and_types.config")
    assert record["check"]["max_relative_error"] == 0.0


def test_verify_says_which_releases_load_the_package(x86_artifact):
    out, manifest = x86_artifact
    running = ort.__version__
    result = run("verify", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["loads"] is True and report["model"] == "model.ort" and report["onnxruntime"] == running
    assert report["digests_checked"] == len(manifest["files"]) - 1  # every file but the manifest itself
    too_old = run("verify", out, "--ort-version", "1.15.1", "--json")  # answered by the format version: no install
    assert too_old.exit_code == 3 and "read by ONNX Runtime 1.16" in json.loads(too_old.output)["why"]
    unchecked = json.loads(run("verify", out, "--ort-version", "1.17.3", "--no-install", "--json").output)
    assert unchecked["loads"] is True and "kernels not checked" in unchecked["why"]


@pytest.mark.parametrize("args, damage, message", [
    (("--ort-version", "one.two"), None, "bad ONNX Runtime release 'one.two'"),
    ((), "flip", "changed since it was built"),
    ((), "truncate", "not a readable ORT format model"),  # a manifest from before the digests
])
def test_verify_refuses_in_one_line(tmp_path, x86_artifact, args, damage, message):
    out = tmp_path / "copy"
    out.mkdir()
    for path in x86_artifact[0].iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    data = bytearray((out / "model.ort").read_bytes())
    if damage == "flip":
        data[-1] ^= 1
    elif damage == "truncate":
        data = data[:100]
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["sha256"]
        (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "model.ort").write_bytes(bytes(data))
    result = run("verify", out, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_tensorrt_target_is_refused_before_any_work(tmp_path):
    result = run("compile", CNN / "model.onnx", "-t", "gpu-ampere", "--calib", CNN / "calib.npz", "--no-measure",
                 "--package", "ort", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "TensorrtExecutionProvider" in result.output
    assert not (tmp_path / "out").exists()


def test_onnx_runtime_tools_load_without_torch():
    """ONNX Runtime's tools package imports torch when it is installed (seconds per build); edgeq's use of it
    does not."""
    code = ("import sys; from edgeq.runtimes import ort_format; ort_format._import_ort_tools(); "
            "from onnxruntime.tools import convert_onnx_models_to_ort, reduced_build_config_parser; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
