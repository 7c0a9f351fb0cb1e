"""The TVM runtime end to end: real Relax imports, real LLVM (and cross, and CUDA) builds, real MetaSchedule tuning
with a database on disk, local and RPC runners, checked against ONNX Runtime."""

import json
import shutil
from importlib import resources
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import rpc_farm
from conftest import EXAMPLES, conv_model, make_model
from edgeq.devices.local import LocalDevice
from edgeq.cli import main
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import host_x86_target, load_target

tvm = pytest.importorskip("tvm", reason="apache-tvm is an optional extra (pip install 'edgeq[tvm]')")

from edgeq.runtimes import tvm_tuning  # noqa: E402
from edgeq.runtimes.tvm import TvmRuntime, library_arch  # noqa: E402

HOST = host_x86_target("tvm")  # the x86 target whose TVM code this machine's CPU runs


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def conv(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), path)
    return path


def feed(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)}


def test_library_runs_like_onnxruntime_and_is_profiled_per_kernel(conv, tmp_path):
    target = load_target(HOST)
    runtime = TvmRuntime(target, feed=feed())
    library = runtime.build(conv, tmp_path)
    assert library.name == "model.so" and library_arch(library) == "x86_64"
    session = runtime.session(library)
    for seed in range(3):
        expected = OnnxRuntime(target).session(conv).run(feed(seed))
        np.testing.assert_allclose(session.run(feed(seed))[0], expected[0], rtol=1e-5, atol=1e-5)
    kernels = {t.name for t in runtime.profile(library, feed(), runs=2)}
    assert any(name.startswith("fused_conv2d") for name in kernels)
    latency = runtime.measure({"a": library}, feed(), warmup=1, repeats=3)["a"]
    assert latency.runs >= 3 and 0 < latency.min_ms <= latency.median_ms


def relu6_model():
    """x → Conv → Clip(0, 6) → depthwise Conv → Clip(0, 6): MobileNet's pattern."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)


def test_cpu_lowering_runs_convolutions_channels_last_with_layout_free_weights(tmp_path):
    path = tmp_path / "relu6.onnx"
    onnx.save(relu6_model(), path)
    target = load_target(HOST)
    runtime = TvmRuntime(target, feed=feed())
    fused = runtime.lower(path)
    kernels = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    convs = [f for name, f in kernels.items() if "conv2d" in name]
    assert len(convs) == 2 and all(f.attrs["layout_free_buffers"] for f in convs)
    calls = [line for line in fused["main"].script().splitlines() if "R.call_tir(fused_conv2d" in line]
    assert len(calls) == 2 and all("R.Tensor((1, 16, 16, 8)" in line for line in calls)  # NHWC: channels last
    # the ReLU6s fuse into the convolutions: only the model's input and output are transposed
    assert sum("transpose" in name for name in kernels) == 2 and not any("maximum" == n for n in kernels)
    library = runtime.build(path, tmp_path)
    for seed in range(2):
        np.testing.assert_allclose(runtime.session(library).run(feed(seed))[0],
                                   OnnxRuntime(target).session(path).run(feed(seed))[0], rtol=1e-5, atol=1e-5)


def test_transformer_library_matches_onnxruntime(tmp_path):
    """The digits transformer: embeddings (take), attention reshapes and squeezes, layer norms, GELU."""
    folder = EXAMPLES / "digits_transformer"
    result = run("compile", folder / "model.onnx", "-t", HOST, "--runtime", "tvm", "--eval", folder / "eval.npz",
                 "--repeats", 3, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    check = json.loads((tmp_path / "out" / "manifest.json").read_text())["tvm"]["check"]
    assert check["run"] and check["ok"] and check["feeds"] == 8


def test_tuning_fills_the_database_and_a_second_compile_is_a_hit(conv, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(cache))
    args = ("compile", conv, "-t", HOST, "--runtime", "tvm", "--tune-trials", 8, "--repeats", 5, "--json")
    first = run(*args, "-o", tmp_path / "a")
    assert first.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    tuning = manifest["tvm"]["tuning"]
    assert tuning["trials_in_database_before"] == 0 and tuning["trials_run"] >= 8 and not tuning["database_hit"]
    assert tuning["database"].startswith(str(cache / "tvm"))
    assert manifest["delivered"]["arch"] == "x86_64" and manifest["delivered"]["runtime"] == "tvm"
    assert manifest["tvm"]["check"]["ok"] and manifest["tvm"]["check"]["max_relative_error"] < 1e-4
    assert {"tvm", "tvm_untuned", "onnxruntime", "tvm_over_onnxruntime"} <= set(manifest["latency"])
    assert manifest["recipe"]["scheme"] == "float" and manifest["recipe"]["tune_trials"] == 8
    second = run(*args, "-o", tmp_path / "b")
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "b" / "manifest.json").read_text())["tvm"]["tuning"]
    assert again["database_hit"] and again["trials_run"] == 0 and again["trials_in_database_before"] >= 8
    assert "database hit" in json.loads((tmp_path / "b" / "manifest.json").read_text())["delivered"]["reason"]


def test_tuned_schedules_are_applied_from_the_database(conv, tmp_path):
    """A record in the database replaces the naive schedule of its task in the build."""
    target = load_target(HOST)
    folder = tvm_tuning.database_dir(tmp_path / "cache", target)
    database = tvm_tuning.open_database(folder)
    runtime = TvmRuntime(target, database, feed())
    fused = runtime.lower(conv)
    report = tvm_tuning.tune(fused, target, 6, database, folder)
    assert report.trials_run >= 6 and report.tasks == len(tvm_tuning.tasks_of(fused, runtime.tvm_target))
    with runtime.tvm_target, database:
        applied = tvm.relax.transform.MetaScheduleApplyDatabase()(fused)
    scheduled = [g.name_hint for g, f in applied.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled", False)]
    assert scheduled
    library = runtime.build(conv, tmp_path)
    np.testing.assert_allclose(runtime.session(library).run(feed())[0],
                               OnnxRuntime(target).session(conv).run(feed())[0], rtol=1e-5, atol=1e-5)


def test_a_tuned_database_keeps_its_best_records_and_counts_every_trial(conv, tmp_path, monkeypatch):
    monkeypatch.setattr(tvm_tuning, "KEEP_RECORDS", 1)
    target = load_target(HOST)
    folder = tvm_tuning.database_dir(tmp_path / "cache", target)
    database = tvm_tuning.open_database(folder)
    runtime = TvmRuntime(target, database, feed())
    fused = runtime.lower(conv)
    tasks = tvm_tuning.tasks_of(fused, runtime.tvm_target)
    report = tvm_tuning.tune(fused, target, 8, database, folder)
    reopened = tvm_tuning.open_database(folder)  # what the next compile reads
    assert 0 < len(reopened.get_all_tuning_records()) <= len(tasks) < report.trials_run
    assert tvm_tuning.recorded_trials(reopened, tasks, folder) == report.trials_run >= 8
    for task in tasks:  # the record kept is the fastest measured
        kept = reopened.get_top_k(reopened.commit_workload(task.dispatched[0]), 1)
        fastest = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
        assert [list(map(float, r.run_secs)) for r in kept] == [list(map(float, r.run_secs)) for r in fastest]
    assert tvm_tuning.tune(runtime.lower(conv), target, 8, reopened, folder).hit


def test_bench_with_tvm_measures_onnxruntime_beside_it(conv):
    result = run("bench", conv, "-t", HOST, "--runtime", "tvm", "--repeats", 5, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["runtime"] == "tvm" and set(report["latency"]) == {str(conv), f"onnxruntime: {conv}"}
    assert report["profile"] and report["profile"][0]["op_type"] == "tvm"


def qdq_model():
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "w")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y"])]
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)


@pytest.mark.parametrize("extra,message", [
    (("--scheme", "int8"), "--runtime tvm builds float models only"),
    (("--sparsity", "2:4"), "needs sparse kernels"),
    (("--device", "rpc://nohost"), "bad device address"),
])
def test_bad_tvm_requests_are_one_line_errors(conv, tmp_path, extra, message):
    result = run("compile", conv, "-t", HOST, "--runtime", "tvm", *extra, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_quantized_models_are_refused_not_built_slower(tmp_path):
    path = tmp_path / "qdq.onnx"
    onnx.save(qdq_model(), path)
    result = run("compile", path, "-t", HOST, "--runtime", "tvm", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "is quantized (" in result.output and "--runtime onnxruntime" in result.output
    assert not (tmp_path / "out").exists()


def test_tune_trials_need_the_tvm_runtime(conv, tmp_path):
    result = run("compile", conv, "-t", HOST, "--random-calibration", "--tune-trials", 4, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "add --runtime tvm" in result.output


def test_targets_list_their_tvm_builds():
    rows = {r["name"]: r for r in json.loads(run("targets", "--json").output)}
    assert rows["jetson-orin"]["tvm"].startswith("cuda sm_87") and "aarch64" in rows["jetson-orin"]["tvm"]
    assert load_target(HOST).tvm.target["mcpu"] in rows[HOST]["tvm"]
    why = LocalDevice().check(load_target("aarch64"), "tvm")
    assert "aarch64" in why


def test_a_cpu_without_the_targets_instruction_set_neither_runs_nor_tunes_its_library(conv, tmp_path, monkeypatch):
    """Code for AVX2/AVX-512 dies of an illegal instruction on a CPU without them: such a library is built but
    not run here, and tuning (which runs candidates) is refused."""
    import edgeq.runtimes.tvm as tvm_runtime

    monkeypatch.setattr(tvm_runtime, "host_cpu", lambda: "x86-64")  # the baseline x86-64: SSE2, no AVX
    why = LocalDevice().check(load_target(HOST), "tvm")
    assert "avx2" in why and "(x86-64) lacks" in why
    tuned = run("compile", conv, "-t", HOST, "--runtime", "tvm", "--tune-trials", 4, "-o", tmp_path / "tuned")
    assert tuned.exit_code == 2 and f"cannot tune {HOST} here" in tuned.output and "--device rpc://" in tuned.output
    assert not (tmp_path / "tuned").exists()
    result = run("compile", conv, "-t", HOST, "--runtime", "tvm", "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert library_arch(tmp_path / "out" / "model.so") == "x86_64"
    assert not manifest["tvm"]["check"]["run"] and not manifest["latency"]["measured"]
    assert "lacks" in manifest["latency"]["why"]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_aarch64_library_is_cross_compiled_and_not_run_here(conv, tmp_path):
    result = run("compile", conv, "-t", "aarch64", "--runtime", "tvm", "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert library_arch(tmp_path / "out" / "model.so") == "aarch64" == manifest["delivered"]["arch"]
    assert not manifest["tvm"]["check"]["run"] and "aarch64" in manifest["tvm"]["check"]["why"]
    assert "feature.has_dotprod" in manifest["tvm"]["target"]


def test_missing_cross_compiler_is_named(conv, tmp_path):
    board = tmp_path / "board.toml"
    source = (resources.files("edgeq.targets") / "aarch64.toml").read_text()
    board.write_text(source.replace('"aarch64-linux-gnu-g++"', '"no-such-g++"'))
    result = run("compile", conv, "-t", board, "--runtime", "tvm", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "cross compiler no-such-g++ not found" in result.output


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA kernels are compiled ahead of time by nvcc")
def test_jetson_orin_library_carries_kernels_that_compile_for_sm87(conv, tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs g++-aarch64-linux-gnu for the Orin's CPU side")
    result = run("compile", conv, "-t", "jetson-orin", "--runtime", "tvm", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert library_arch(tmp_path / "out" / "model.so") == "aarch64"
    kernels = manifest["tvm"]["cuda_kernels"]
    assert kernels["arch"] == "sm_87" and kernels["nvcc_check"].startswith("ok") and kernels["source_bytes"] > 1000
    assert b"__global__" in (tmp_path / "out" / "model.so").read_bytes()  # the kernels travel in the library


@pytest.fixture
def rpc_board():
    """A TVM RPC tracker and one plain TVM rpc_server registered under the key 'board', both on this machine."""
    with rpc_farm.farm([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1"]) as address:
        yield address


def test_tuning_and_measurement_through_an_rpc_tracker(conv, tmp_path, rpc_board, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))
    result = run("compile", conv, "-t", HOST, "--runtime", "tvm", "--tune-trials", 4, "--device", rpc_board,
                 "--repeats", 5, "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tvm"]["tuning"]["runner"] == rpc_board and manifest["tvm"]["tuning"]["trials_run"] >= 4
    assert manifest["tvm"]["tuning"]["boards"] == 1
    assert manifest["tvm"]["check"]["ok"]  # outputs computed on the board
    assert "tvm" in manifest["latency"] and "onnxruntime" not in manifest["latency"]
    assert manifest["latency"]["device"]["address"] == rpc_board  # where the latency was measured
