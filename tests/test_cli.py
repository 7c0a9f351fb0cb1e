"""End-to-end: the CLI on real files, the bundled digits examples, and every bad-input path."""

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, HOST_X86, conv_model, make_model, write_feeds
from edgeq.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def compile_args(model, feeds, out, *extra):
    return ("compile", model, "-t", HOST_X86, "--calib", feeds, "-o", out, "--repeats", 20, *extra)


def test_digits_cnn_int8_within_budget_and_never_slower(tmp_path):
    cnn = EXAMPLES / "digits_cnn"
    args = (cnn / "model.onnx", cnn / "calib.npz")
    budget = ("--eval", cnn / "eval.npz", "--metric", EXAMPLES / "metric.py:accuracy", "--max-drop", "0.3%")
    result = run(*compile_args(*args, tmp_path / "int8", *budget, "--no-measure"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    metric = manifest["fidelity"]["metric"]
    assert metric["float"] > 0.95 and metric["drop"] <= 0.003
    assert manifest["budget"]["met"]
    assert manifest["quantization"]["quantized_nodes"] >= 5
    assert manifest["inputs"]["calibration"]["feeds"] == 256 and not manifest["inputs"]["calibration"]["random"]
    onnx.checker.check_model(str(tmp_path / "int8" / "model.onnx"))
    # measured: int8 (whole or in part) delivered only when it measured faster, else float with the reason
    result = run(*compile_args(*args, tmp_path / "measured", *budget))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "measured" / "manifest.json").read_text())
    if manifest["delivered"]["precision"] == "int8":
        assert manifest["latency"]["ratio"] <= 0.97
    else:
        assert "slower" in manifest["delivered"]["reason"] or "faster" in manifest["delivered"]["reason"]
    assert {"float_ms", "int8_ms", "node"} <= set(manifest["per_node"][0])


def test_same_inputs_give_identical_bytes(tmp_path, conv_onnx, conv_feeds):
    for name in ("a", "b"):
        assert run(*compile_args(conv_onnx, conv_feeds, tmp_path / name, "--no-measure", "--no-cache")).exit_code == 0
    assert (tmp_path / "a/model.onnx").read_bytes() == (tmp_path / "b/model.onnx").read_bytes()


def test_calibration_cache_is_hit_on_second_compile(tmp_path, conv_onnx, conv_feeds):
    for name in ("a", "b"):
        assert run(*compile_args(conv_onnx, conv_feeds, tmp_path / name, "--no-measure", "--method", "entropy")).exit_code == 0
    first = json.loads((tmp_path / "a/manifest.json").read_text())["calibration"]
    second = json.loads((tmp_path / "b/manifest.json").read_text())["calibration"]
    assert not first["cache_hit"] and second["cache_hit"]
    assert (tmp_path / "a/model.onnx").read_bytes() == (tmp_path / "b/model.onnx").read_bytes()


def test_budget_missed_exits_3_and_still_writes(tmp_path):
    """Two classes whose logits differ by ~1e-4: int8 cannot keep their order, so top-1 agreement drops."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 10)).astype(np.float32) * 0.1
    w[:, 0] = np.abs(rng.standard_normal(64)) * 3
    w[:, 1] = w[:, 0] + rng.standard_normal(64).astype(np.float32) * 1e-4
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="logits")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                       [numpy_helper.from_array(w, "w")])
    onnx.save(model, tmp_path / "m.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(40):
        np.savez(feeds / f"{i}.npz", x=np.abs(rng.standard_normal((1, 64))).astype(np.float32))
    result = run(*compile_args(tmp_path / "m.onnx", feeds, tmp_path / "out", "--max-drop", "0", "--no-measure"))
    assert result.exit_code == 3, result.output
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert not manifest["budget"]["met"] and manifest["budget"]["drop"] > 0


def test_json_output_and_targets_and_inspect(tmp_path, conv_onnx, conv_feeds):
    result = run(*compile_args(conv_onnx, conv_feeds, tmp_path / "o", "--no-measure", "--json"))
    assert result.exit_code == 0 and json.loads(result.output)["delivered"]["precision"] == "int8"
    targets = json.loads(run("targets", "--json").output)
    assert {t["name"] for t in targets} >= {"x86-64", "x86-avx512-vnni", "aarch64"}
    info = json.loads(run("inspect", conv_onnx, "--json", "--nodes").output)
    assert info["ops"]["Conv"] == 2 and info["coverage"]["quantizable_share"] == 1.0
    assert any(n["name"] == "conv1" for n in info["nodes"])


def test_cross_architecture_target_compiles_without_measuring(tmp_path, conv_onnx, conv_feeds):
    out = tmp_path / "arm"
    result = run("compile", conv_onnx, "-t", "aarch64", "--calib", conv_feeds, "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latency"]["measured"] is False and "aarch64" in manifest["delivered"]["reason"]
    zero_points = [numpy_helper.to_array(i) for i in onnx.load(str(out / "model.onnx")).graph.initializer
                   if i.name == "x_zero_point"]
    assert zero_points[0].dtype == np.int8


def test_external_data_inside_folder_works(tmp_path, conv_feeds):
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(conv_model(), folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    assert (folder / "m.data").is_file()
    assert run(*compile_args(folder / "m.onnx", conv_feeds, tmp_path / "out", "--no-measure")).exit_code == 0


def _escaping_external_data(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(conv_model(), folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    shutil.move(folder / "m.data", tmp_path / "secret.data")
    onnx.save(proto, folder / "m.onnx")
    return folder / "m.onnx"


def _bad_inputs(tmp_path, conv_onnx, conv_feeds):
    (tmp_path / "junk.onnx").write_text("this is not protobuf")
    (tmp_path / "trunc.onnx").write_bytes(conv_onnx.read_bytes()[:200])
    (tmp_path / "empty").mkdir()
    write_feeds(tmp_path / "wrong_name", "image", (1, 3, 16, 16), 4)
    write_feeds(tmp_path / "wrong_shape", "x", (1, 3, 8, 8), 4)
    nan = write_feeds(tmp_path / "nan", "x", (1, 3, 16, 16), 4)
    np.savez(nan / "feed_0002.npz", x=np.full((1, 3, 16, 16), np.inf, np.float32))
    q = make_model([helper.make_node("QuantizeLinear", ["x", "s"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, [4])],
                   [numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    onnx.save(q, tmp_path / "q.onnx")
    dropout = make_model([helper.make_node("Dropout", ["x", "ratio", "training"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])],
                         [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                          numpy_helper.from_array(np.array(True), "training")])
    onnx.save(dropout, tmp_path / "training.onnx")
    return {
        "missing file": (tmp_path / "nope.onnx", conv_feeds, "-t", "x86-64", "not found"),
        "not onnx": (tmp_path / "junk.onnx", conv_feeds, "-t", "x86-64", "not a readable ONNX"),
        "corrupt": (tmp_path / "trunc.onnx", conv_feeds, "-t", "x86-64", "not a readable ONNX"),
        "empty calib": (conv_onnx, tmp_path / "empty", "-t", "x86-64", "empty"),
        "feed names": (conv_onnx, tmp_path / "wrong_name", "-t", "x86-64", "lacks model input 'x'"),
        "feed shapes": (conv_onnx, tmp_path / "wrong_shape", "-t", "x86-64", "shape"),
        "nan feeds": (conv_onnx, nan, "-t", "x86-64", "NaN or Inf"),
        "unknown target": (conv_onnx, conv_feeds, "-t", "riscv-toaster", "unknown target"),
        "already quantized": (tmp_path / "q.onnx", conv_feeds, "-t", "x86-64", "already quantized"),
        "training mode": (tmp_path / "training.onnx", conv_feeds, "-t", "x86-64", "exported in training mode"),
        "escaping data": (_escaping_external_data(tmp_path), conv_feeds, "-t", "x86-64", "outside the model's folder"),
    }


@pytest.mark.parametrize("case", ["missing file", "not onnx", "corrupt", "empty calib", "feed names", "feed shapes",
                                  "nan feeds", "unknown target", "already quantized", "training mode",
                                  "escaping data"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, conv_onnx, conv_feeds, case):
    model, feeds, flag, target, message = _bad_inputs(tmp_path, conv_onnx, conv_feeds)[case]
    out = tmp_path / "out"
    result = run("compile", model, flag, target, "--calib", feeds, "-o", out, "--no-measure")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1] and message in errors[0], result.output
    assert all(line.startswith("✓") for line in lines[:-1])  # only finished-stage lines before it
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_no_calibration_data_needs_an_explicit_flag(tmp_path, conv_onnx):
    result = run("compile", conv_onnx, "-t", "x86-64", "-o", tmp_path / "o", "--no-measure")
    assert result.exit_code == 2 and "--random-calibration" in result.output
    result = run("compile", conv_onnx, "-t", "x86-64", "-o", tmp_path / "o", "--no-measure", "--random-calibration")
    assert result.exit_code == 0
    assert json.loads((tmp_path / "o/manifest.json").read_text())["inputs"]["calibration"]["random"]


def test_output_folder_that_is_not_an_artifact_is_refused(tmp_path, conv_onnx, conv_feeds):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    result = run(*compile_args(conv_onnx, conv_feeds, out, "--no-measure"))
    assert result.exit_code == 2 and (out / "thesis.txt").exists()


def test_large_model_path_writes_external_data_beside_the_model(tmp_path, conv_onnx, conv_feeds, monkeypatch):
    """Models over protobuf's 2 GB limit are saved with external data; the threshold is lowered here so a
    tiny model takes that path (a real 2.2 GB model was checked by hand, see the README)."""
    import edgeq.model_io

    monkeypatch.setattr(edgeq.model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "big"
    result = run(*compile_args(conv_onnx, conv_feeds, out, "--no-measure"))
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx.data").is_file()
    proto = onnx.load(str(out / "model.onnx"))  # loads the external data from beside it
    assert any(i.name == "w2_axis0_quantized" for i in proto.graph.initializer)


def test_bench_command_reports_interleaved_latency(tmp_path, conv_onnx):
    result = run("bench", conv_onnx, "-t", HOST_X86, "--compare", conv_onnx, "--repeats", 5, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["random_inputs"] and len(report["latency"]) == 1  # same path twice is one model
    assert report["profile"][0]["ms"] > 0
    result = run("bench", conv_onnx, "-t", "aarch64")
    assert result.exit_code == 2 and "cannot measure" in result.output


def _vector_feeds(folder, other_inputs, count=10):
    """Feeds with x[1, 8] plus the control inputs ``other_inputs(i)`` returns."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        np.savez(folder / f"{i}.npz", x=rng.standard_normal((1, 8)).astype(np.float32), **other_inputs(i))
    return folder


def test_compute_inside_if_branches_is_quantized_end_to_end(tmp_path):
    from test_insert_qdq import _if_model

    onnx.save(_if_model(), tmp_path / "if.onnx")
    feeds = _vector_feeds(tmp_path / "feeds", lambda i: {"cond": np.array(i % 2 == 0)})
    result = run(*compile_args(tmp_path / "if.onnx", feeds, tmp_path / "out", "--no-measure", "--no-guard"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["delivered"]["precision"] == "int8"
    assert manifest["quantization"]["quantized_nodes"] == 2
    assert manifest["quantization"]["subgraph_compute_left_float"] == 0


def test_compute_only_inside_a_loop_is_quantized_end_to_end(tmp_path):
    from test_insert_qdq import _loop_model

    onnx.save(_loop_model(), tmp_path / "loop.onnx")
    feeds = _vector_feeds(tmp_path / "feeds", lambda i: {"n": np.array(3)})
    # what is quantized, not whether its 16 toy values hold the guard
    result = run(*compile_args(tmp_path / "loop.onnx", feeds, tmp_path / "out", "--no-measure", "--no-guard"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["delivered"]["precision"] == "int8"
    assert manifest["quantization"]["decisions"]["body_matmul"]["quantized"]
    assert manifest["quantization"]["subgraph_compute_left_float"] == 0
    assert manifest["calibration"]["subgraphs"]["observed"] == "all subgraphs"


def test_a_measured_build_replays_byte_for_byte_from_its_manifest(tmp_path):
    cnn = EXAMPLES / "digits_cnn"
    first = tmp_path / "first"
    # int8 is delivered even where this CPU runs it slower (the digits CNN is tiny): the int8 build is replayed
    assert run(*compile_args(cnn / "model.onnx", cnn / "calib.npz", first, "--allow-slowdown")).exit_code == 0
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["delivered"]["precision"] == "int8" and manifest["latency"]
    recipe = manifest["recipe"]
    replay = ["--optional-ops", recipe["optional_ops"], "--method", recipe["method"], "--no-measure"]
    for name in recipe["keep_float"]:
        replay += ["--keep-float", name]
    again = tmp_path / "again"
    assert run(*compile_args(cnn / "model.onnx", cnn / "calib.npz", again, *replay)).exit_code == 0
    assert (first / "model.onnx").read_bytes() == (again / "model.onnx").read_bytes()


def test_an_earlier_artifact_is_replaced_whole_and_a_foreign_file_is_never_wiped(tmp_path, conv_onnx, conv_feeds):
    out = tmp_path / "art"
    assert run(*compile_args(conv_onnx, conv_feeds, out, "--no-measure")).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["files"] == ["manifest.json", "model.onnx", "report.html"]
    assert run(*compile_args(conv_onnx, conv_feeds, out, "--no-measure", "--method", "minmax")).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["recipe"]["method"] == "minmax"
    (out / "notes.txt").write_text("the user's own file")
    result = run(*compile_args(conv_onnx, conv_feeds, out, "--no-measure"))
    assert result.exit_code == 2 and "notes.txt" in result.output and (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".art")) == []


@pytest.mark.parametrize("case", ["manifest only", "inputs inside", "symlink", "not edgeq json"])
def test_output_folders_edgeq_must_not_replace(tmp_path, conv_onnx, conv_feeds, case):
    out = tmp_path / "out"
    out.mkdir()
    model, feeds = conv_onnx, conv_feeds
    if case == "manifest only":  # any folder with a manifest.json used to be wiped whole
        (out / "manifest.json").write_text("{}")
        (out / "data.csv").write_text("1,2,3")
    elif case == "inputs inside":
        model = out / "conv.onnx"
        shutil.copy(conv_onnx, model)
        (out / "manifest.json").write_text(json.dumps({"edgeq": "artifact/1", "files": ["conv.onnx"]}))
    elif case == "symlink":
        out.rmdir()
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    else:
        (out / "manifest.json").write_text(json.dumps({"name": "someone else's"}))
    before = sorted(p.name for p in out.iterdir())
    result = run(*compile_args(model, feeds, out, "--no-measure"))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert sorted(p.name for p in out.iterdir()) == before


def test_stale_temporary_folders_of_dead_processes_are_swept(tmp_path, conv_onnx, conv_feeds):
    dead = tmp_path / ".art.edgeq-999999999-abc"  # a pid no process has
    dead.mkdir()
    (dead / "model.onnx").write_text("half written")
    assert run(*compile_args(conv_onnx, conv_feeds, tmp_path / "art", "--no-measure")).exit_code == 0
    assert not dead.exists()
