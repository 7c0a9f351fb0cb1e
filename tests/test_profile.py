"""``edgeq profile``: per-node times on the device as profile.json (one schema for ONNX Runtime and TVM) and a
self-contained report.html; bad input is one line, exit 2, nothing written."""

import json
import re
import shlex
import sys

import jsonschema
import onnx
import pytest
from click.testing import CliRunner

from conftest import HOST_X86, conv_model
from edgeq import schema
from edgeq.cli import main
from edgeq.errors import UserError
from edgeq.profile import PROFILE, REPORT, check_output, tvm_pattern, write
from test_insert_qdq import quantize

VALIDATOR = jsonschema.Draft202012Validator


def run(*args):
    return CliRunner().invoke(main, ["profile", *map(str, args)])


@pytest.fixture
def models(tmp_path):
    """The conv model and its int8 build."""
    float_path, int8_path = tmp_path / "conv.onnx", tmp_path / "conv_int8.onnx"
    onnx.save(conv_model(), float_path)
    onnx.save(quantize(conv_model())[0], int8_path)
    return float_path, int8_path


def written(out) -> dict:
    assert sorted(p.name for p in out.iterdir()) == [PROFILE, REPORT]
    profile = json.loads((out / PROFILE).read_text())
    VALIDATOR(schema.load(schema.PROFILE)).validate(profile)
    return profile


def assert_self_contained(page: str) -> None:
    assert "<script" not in page and not re.search(r'\s(src|href)=', page)  # nothing fetched, nothing run
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}  # a namespace


def test_the_schema_is_a_valid_json_schema():
    VALIDATOR.check_schema(schema.load(schema.PROFILE))


def test_float_against_int8_per_onnx_node(models, tmp_path):
    float_path, int8_path = models
    out = tmp_path / "out"
    result = run(float_path, "-t", HOST_X86, "--compare", int8_path, "--runs", 3, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    profile = written(out)
    assert json.loads(result.stdout) == profile
    assert profile["runtime"] == "onnxruntime" and profile["names"] == "onnx-nodes" and profile["target"] == HOST_X86
    assert profile["device"]["address"] == "local" and profile["feeds"]["random"] is True
    assert profile["feeds"]["inputs"] == {"x": {"dtype": "float32", "shape": [1, 3, 16, 16]}}
    assert profile["model"] == "conv.onnx" and list(profile["models"]) == ["conv.onnx", "conv_int8.onnx"]

    fp, q8 = ({n["name"]: n for n in profile["models"][label]["nodes"]} for label in profile["models"])
    # ORT's kernels map back to the ONNX node names, through its fusions (Conv+Relu in NCHWc; DQ→Conv→Q)
    assert {name: fp[name]["op_type"] for name in ("conv1", "conv2", "fc")} == {"conv1": "Conv", "conv2": "Conv",
                                                                                 "fc": "Gemm"}
    assert "relu1" not in fp  # the Relu fused into conv1's kernel is conv1's time
    assert {name: q8[name]["op_type"] for name in ("conv1", "conv2", "fc")} == {"conv1": "QLinearConv",
                                                                                 "conv2": "QLinearConv", "fc": "QGemm"}
    for model in profile["models"].values():
        assert model["latency"]["conditions"]["device"] == "local"
        assert sum(n["share"] for n in model["nodes"]) == pytest.approx(1.0)
        assert sum(model["op_types"].values()) == pytest.approx(model["total_ms"])
        assert [n["ms"] for n in model["nodes"]] == sorted((n["ms"] for n in model["nodes"]), reverse=True)

    compare = profile["compare"]
    assert (compare["model"], compare["with"]) == ("conv.onnx", "conv_int8.onnx") and compare["latency_ratio"] > 0
    rows = {r["name"]: r for r in compare["nodes"]}
    conv1 = rows["conv1"]
    assert conv1["op_types"] == {"conv.onnx": "Conv", "conv_int8.onnx": "QLinearConv"}
    assert conv1["ratio"] == pytest.approx(conv1["ms"]["conv_int8.onnx"] / conv1["ms"]["conv.onnx"])
    quantize_rows = [r for r in compare["nodes"] if r["op_types"] == {"conv_int8.onnx": "QuantizeLinear"}]
    assert quantize_rows and all(r["ms"]["conv.onnx"] is None and r["ratio"] is None for r in quantize_rows)

    page = (out / REPORT).read_text()
    assert_self_contained(page)
    for name in ("conv1", "conv2", "fc", "conv.onnx", "conv_int8.onnx", HOST_X86, "QLinearConv"):
        assert name in page
    assert "flagged" in page  # the latency's conditions are shown, flagged or not
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_tvm_kernels_in_the_same_schema(tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm is an optional extra (pip install 'edgeq[tvm]')")
    from edgeq.target import host_x86_target

    target = host_x86_target("tvm")
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), path)
    out = tmp_path / "out"
    result = run(path, "-t", target, "--runtime", "tvm", "--runs", 3, "-o", out)
    assert result.exit_code == 0, result.output
    assert "fused_conv2d" in result.stdout  # the table of costliest kernels
    profile = written(out)
    assert profile["runtime"] == "tvm" and profile["names"] == "tvm-kernels" and "compare" not in profile
    assert profile["device"]["tvm"]
    nodes = profile["models"]["conv.onnx"]["nodes"]
    convs = [n for n in nodes if n["name"].startswith("fused_conv2d")]
    assert convs and all(n["op_type"].startswith("conv2d") for n in convs)
    assert not any(re.search(r"\d$", op) for op in profile["models"]["conv.onnx"]["op_types"])
    page = (out / REPORT).read_text()
    assert_self_contained(page)
    assert convs[0]["name"] in page


def test_tvm_patterns_drop_tvm_numbering():
    assert tvm_pattern("fused_conv2d1_add1_add2_relu11") == "conv2d_add_add_relu"
    assert tvm_pattern("max_pool2d1") == "max_pool2d"
    assert tvm_pattern("fused_transpose1_reshape1") == "transpose_reshape"
    assert tvm_pattern("conv3d") == "conv3d"


@pytest.mark.parametrize("case", ["missing model", "missing compare", "other inputs", "foreign -o", "artifact -o"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(models, tmp_path, case):
    float_path, _ = models
    other = tmp_path / "big.onnx"
    onnx.save(conv_model(size=32), other)
    out = tmp_path / "out"
    args = [float_path, "-t", HOST_X86, "-o", out]
    if case == "missing model":
        args[0] = tmp_path / "nope.onnx"
    elif case == "missing compare":
        args += ["--compare", tmp_path / "nope.onnx"]
    elif case == "other inputs":
        args += ["--compare", other]
    else:
        out.mkdir()
        (out / ("notes.txt" if case == "foreign -o" else "manifest.json")).write_text(
            "mine" if case == "foreign -o" else json.dumps({"edgeq": "artifact/1", "files": ["manifest.json"]}))
    before = sorted(p.name for p in tmp_path.iterdir()) + (sorted(p.name for p in out.iterdir()) if out.exists()
                                                           else [])
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if case == "other inputs":
        assert "--compare model big.onnx does not take conv.onnx's inputs" in lines[0] and "[1,3,32,32]" in lines[0]
    after = sorted(p.name for p in tmp_path.iterdir()) + (sorted(p.name for p in out.iterdir()) if out.exists()
                                                          else [])
    assert after == before


def test_an_earlier_profile_is_replaced_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    profile = {"edgeq": "profile/1", "n": 1}
    write(out, profile, "<p>one</p>")
    write(out, profile | {"n": 2}, "<p>two</p>")
    assert json.loads((out / PROFILE).read_text())["n"] == 2 and (out / REPORT).read_text() == "<p>two</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "extra.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        check_output(out)
    model = tmp_path / "in" / "m.onnx"
    model.parent.mkdir()
    model.write_text("x")
    with pytest.raises(UserError, match="input"):
        check_output(tmp_path / "in", (model,))


def test_an_ssh_board_gives_the_same_schema(models, tmp_path, tmp_path_factory, monkeypatch):
    """ONNX Runtime profiled on a board over ssh (a real sshd on 127.0.0.1): the device recorded, the names mapped."""
    import sshd

    why = sshd.available()
    if why:
        pytest.skip(why)
    float_path, int8_path = models
    folder = tmp_path_factory.mktemp("board")
    python = folder / "python"
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    with sshd.sshd(folder / "sshd", folder / "device files") as (port, options):
        monkeypatch.setenv("EDGEQ_SSH_OPTIONS", options)
        address = f"ssh://root@127.0.0.1:{port}{python}"
        out = tmp_path / "out"
        result = run(float_path, "-t", HOST_X86, "--device", address, "--compare", int8_path, "--runs", 3, "-o", out)
    assert result.exit_code == 0, result.output
    profile = written(out)
    assert profile["device"]["address"] == address and profile["device"]["arch"] == "x86_64"
    assert all(m["latency"]["conditions"]["device"] == address for m in profile["models"].values())
    assert {"conv1", "conv2", "fc"} <= {n["name"] for n in profile["models"]["conv_int8.onnx"]["nodes"]}
    assert address in (out / REPORT).read_text()
