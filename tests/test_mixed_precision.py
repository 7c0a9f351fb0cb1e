"""Mixed precision: int4 weight-only QDQ, decision groups, the ILP allocator, and the whole search end to end."""

import itertools
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, HOST_X86, conv_model, make_model
from edgeq.cli import main
from edgeq.errors import UserError
from edgeq.mixed.allocate import pareto_front, predicted_nsr, solve
from edgeq.mixed.costs import Costs
from edgeq.mixed.groups import Group, layer_groups
from edgeq.mixed import sensitivity
from edgeq.mixed.sensitivity import Sensitivity, measure_sensitivity, output_nsr
from edgeq.passes.convert_opset import ConvertOpsetPass
from edgeq.passes.insert_qdq import InsertQDQPass, int4_blockwise
from edgeq.recipe import Recipe
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import load_target

TARGET = load_target(HOST_X86)
FULL_RANGE_RULES = load_target("x86-avx512-vnni").quantization  # 8-bit weights (x86-64's are 7-bit)


def mlp_model(seed: int = 0, shared: bool = False) -> onnx.ModelProto:
    """x[4,64] → MatMul(w1 64×128) → Relu → MatMul(w2 128×64) → Concat with a second MatMul(w3) → y."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 128)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((128, 64)).astype(np.float32) * 0.1
    w3 = rng.standard_normal((128, 64)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["a"], name="mm2"),
             helper.make_node("MatMul", ["r", "w2" if shared else "w3"], ["b"], name="mm3"),
             helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
             helper.make_node("MatMul", ["c", "w4"], ["y"], name="mm4")]
    inits = [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    inits.append(numpy_helper.from_array(rng.standard_normal((128, 16)).astype(np.float32) * 0.1, "w4"))
    return onnx.shape_inference.infer_shapes(make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits))


def ranges_for(model: onnx.ModelProto) -> dict:
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    names = ["x", "h", "r", "a", "b", "c", "y"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for name in names[1:-1]:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    outputs = ort.InferenceSession(probe.SerializeToString()).run(None, {"x": x})
    found = dict(zip(["y", *names[1:-1]], outputs)) | {"x": x}
    return {n: (float(found[n].min()), float(found[n].max())) for n in names}


def test_int4_blockwise_is_exact_for_zeros_and_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    w[:32, 0] = 0.0
    q, scale, zero = int4_blockwise(w, 32)
    assert q.shape == w.shape and scale.shape == zero.shape == (2, 8) and q.max() <= 15
    back = (q.reshape(2, 32, 8).astype(np.float32) - zero[:, None, :]) * scale[:, None, :]
    back = back.reshape(64, 8)
    assert np.all(back[:32, 0] == 0.0)
    step = np.repeat(scale, 32, axis=0)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


def test_per_node_precisions_build_a_model_ort_runs(tmp_path):
    proto = mlp_model()
    model = ir.serde.deserialize_model(proto)
    ConvertOpsetPass(21)(model)  # int4 Q/DQ needs opset 21: converted, never relabelled
    insert = InsertQDQPass(TARGET.quantization, ranges_for(proto),
                           precisions={"mm1": "int4", "mm2": "float", "mm4": "fp16"}, int4_block_size=32)
    insert(model)
    d = insert.decisions
    assert [d[n].precision for n in ("mm1", "mm2", "mm3", "mm4")] == ["int4", "float", "int8", "fp16"]
    half = [n for n in model.graph if n.op_type == "Cast"]
    assert len(half) == 1 and half[0].inputs[0].const_value.dtype == ir.DataType.FLOAT16
    assert "mixed-precision allocation" in d["mm2"].reason
    assert model.opset_imports[""] == 21
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.attributes.get_int("block_size", 0)]
    assert len(dq) == 1 and dq[0].inputs[0].const_value.dtype == ir.DataType.UINT4
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    out = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert output_nsr([[ref]], [[out]]) < 0.05  # int4 on Gaussian weights: ~20 dB for that layer


def test_int4_is_refused_where_it_cannot_serve():
    proto = conv_model()
    model = ir.serde.deserialize_model(proto)
    ranges = {v: (-4.0, 4.0) for v in ("x", "c1", "r1", "p1", "c2", "a1", "r2", "g1", "f1", "y")}
    insert = InsertQDQPass(TARGET.quantization, ranges, precisions={"conv1": "int4", "fc": "int4"})
    insert(model)
    assert not insert.decisions["conv1"].quantized and "MatMul" in insert.decisions["conv1"].reason
    assert not insert.decisions["fc"].quantized


@pytest.mark.parametrize("shared", [False, True])
def test_groups_join_concat_inputs_and_shared_weights(shared):
    proto = mlp_model(shared=shared)
    model = ir.serde.deserialize_model(proto)
    insert = InsertQDQPass(TARGET.quantization, ranges_for(proto))
    insert(ir.serde.deserialize_model(proto))
    groups = layer_groups(model, insert.decisions, ("float", "fp16", "int8", "int4"), ("Relu", "Clip"), 32)
    members = sorted(tuple(sorted(g.nodes)) for g in groups)
    assert members == [("mm1",), ("mm2", "mm3"), ("mm4",)]  # Concat inputs together (and a shared w2)
    by_name = {n: g for g in groups for n in g.nodes}
    assert by_name["mm1"].timed == ("mm1", "relu")
    for g in groups:
        assert g.precisions == ("float", "fp16", "int8", "int4")
        assert g.bytes["int4"] < g.bytes["int8"] < g.bytes["fp16"] < g.bytes["float"]
    mm23 = by_name["mm2"].bytes["float"]
    assert mm23 == (1 if shared else 2) * 128 * 64 * 4  # a shared weight is stored once


def _tables(seed=0, groups=5):
    rng = np.random.default_rng(seed)
    gs = [Group(f"g{i}", (f"g{i}",), "Conv", ("float", "int8", "int4")) for i in range(groups)]
    nsr = {g.name: {"float": 0.0, "int8": float(rng.uniform(1e-4, 1e-2)), "int4": float(rng.uniform(1e-3, 5e-2))}
           for g in gs}
    ms = {g.name: {"float": float(rng.uniform(1, 3))} for g in gs}
    for g in gs:
        ms[g.name] |= {"int8": ms[g.name]["float"] * rng.uniform(0.2, 1.2),
                       "int4": ms[g.name]["float"] * rng.uniform(0.5, 1.5)}
    size = {g.name: {"float": 4000, "int8": 1000, "int4": 500} for g in gs}
    return gs, Sensitivity(nsr, 8), Costs(ms, size, 1.0, 100)


def _brute(gs, sens, costs, minimize, **caps):
    best = None
    for combo in itertools.product(*(g.precisions for g in gs)):
        assign = dict(zip((g.name for g in gs), combo))
        ms, size = costs.predict(assign)
        nsr = predicted_nsr(sens, assign)
        if (caps.get("max_nsr") is not None and nsr > caps["max_nsr"]) or \
                (caps.get("max_ms") is not None and ms > caps["max_ms"]) or \
                (caps.get("max_bytes") is not None and size > caps["max_bytes"]):
            continue
        value = ms if minimize == "latency" else nsr
        if best is None or value < best[0] - 1e-12:
            best = (value, assign)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_ilp_matches_brute_force(seed):
    gs, sens, costs = _tables(seed)
    for minimize, caps in (("latency", {"max_nsr": 0.01}), ("latency", {"max_nsr": 0.02, "max_bytes": 9000}),
                           ("nsr", {"max_ms": 8.0}), ("nsr", {"max_ms": 9.0, "max_bytes": 12000})):
        expected = _brute(gs, sens, costs, minimize, **caps)
        got = solve(gs, sens, costs, minimize, caps.get("max_nsr"), caps.get("max_ms"), caps.get("max_bytes"))
        if expected is None:
            assert got is None
            continue
        value = costs.predict(got)[0] if minimize == "latency" else predicted_nsr(sens, got)
        assert value == pytest.approx(expected[0], rel=1e-6, abs=1e-12)


def test_infeasible_budget_gives_none_and_frontier_trades_speed_for_noise():
    gs, sens, costs = _tables(1)
    assert solve(gs, sens, costs, "nsr", max_ms=0.5) is None
    front = pareto_front(gs, sens, costs)
    points = [(costs.predict(a)[0], predicted_nsr(sens, a)) for a in front]
    assert len(points) >= 3 and points[-1][1] == 0.0  # ends all float
    for (ms_a, nsr_a), (ms_b, nsr_b) in itertools.pairwise(points):
        assert ms_b >= ms_a - 1e-9 and nsr_b <= nsr_a + 1e-12


def test_output_nsr_takes_the_worst_output():
    ref = [[np.ones(4, np.float32), np.full(4, 2.0, np.float32)]]
    out = [[np.ones(4, np.float32) * 1.1, np.full(4, 2.0, np.float32)]]
    assert output_nsr(ref, out) == pytest.approx(0.01, rel=1e-5)


def test_output_nsr_of_a_decoder_that_stops_at_another_step():
    """A table decoder's [1, steps, 8] boxes: one group's int8 ends the sequence two steps early; the steps it
    lost count whole."""
    ref = [[np.ones((1, 12, 8), np.float32)]]
    assert output_nsr(ref, [[np.ones((1, 10, 8), np.float32)]]) == pytest.approx(2 / 12)
    assert output_nsr(ref, [[np.ones((1, 14, 8), np.float32)]]) == pytest.approx(2 / 12)
    assert output_nsr(ref, [[np.ones((12, 8), np.float32)]]) == np.inf


def test_output_nsr_of_detections_is_free_of_their_order():
    """A detector's boxes after its NMS: one group's int8 swaps two boxes of close score and moves one by a
    pixel — elementwise that is two boxes wholly wrong; matched, only the pixel counts — and loses a third box,
    which counts whole; each column (x1, y1, x2, y2) is a quantity of its own, the worst one counts."""
    boxes = np.array([[10, 10, 50, 50], [100, 100, 150, 160], [200, 20, 260, 90]], np.float32)
    moved = boxes[[1, 0]] + np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    columns = np.square(boxes.astype(np.float64)).sum(0)
    lost = np.square(boxes[2].astype(np.float64)) + [1, 0, 0, 0]
    assert output_nsr([[boxes]], [[moved]], sets={0: None}) == pytest.approx(max(lost / columns))
    assert output_nsr([[boxes]], [[moved]]) > 0.5  # elementwise: the swap and the lost box


def test_sensitivity_runs_as_many_feeds_as_its_time_allows(tmp_path, monkeypatch):
    proto = mlp_model()
    float_path = tmp_path / "float.onnx"
    onnx.save(proto, float_path)
    insert = InsertQDQPass(TARGET.quantization, ranges_for(proto))
    insert(ir.serde.deserialize_model(proto))
    groups = layer_groups(ir.serde.deserialize_model(proto), insert.decisions, ("float", "int8"), ("Relu",), 32)
    builds = itertools.count()

    def build(precisions):
        model = ir.serde.deserialize_model(proto)
        InsertQDQPass(TARGET.quantization, ranges_for(proto), precisions=precisions)(model)
        path = tmp_path / f"b{next(builds)}" / "model.onnx"
        path.parent.mkdir()
        ir.save(model, path)
        return path

    rng = np.random.default_rng(3)
    feeds = [type("Feed", (), {"inputs": {"x": rng.standard_normal((4, 64)).astype(np.float32)}}) for _ in range(8)]
    runtime = OnnxRuntime(TARGET)
    tables = {}
    for budget in (60.0, 0.0):  # a tiny model fits every feed; no time left still measures on MIN_FEEDS
        monkeypatch.setattr(sensitivity, "RUN_SECONDS", budget)
        tables[budget] = measure_sensitivity(groups, build, runtime, float_path, feeds)
    assert tables[60.0].feeds == 8 and tables[0.0].feeds == sensitivity.MIN_FEEDS
    for table in tables.values():
        assert all(figures["int8"] > 0 for figures in table.nsr.values())
    assert tables[60.0].nsr != tables[0.0].nsr


def test_recipe_needs_a_budget_and_budgets_need_mixed():
    with pytest.raises(UserError, match="needs a budget"):
        Recipe(scheme="mixed")
    with pytest.raises(UserError, match="--scheme mixed"):
        Recipe(latency_ms=3.0)
    assert Recipe(scheme="mixed", size_mb=1.0).size_mb == 1.0


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def mixed_args(example: str, out, *extra):
    folder = EXAMPLES / example
    return ("compile", folder / "model.onnx", "-t", HOST_X86, "--calib", folder / "calib.npz",
            "--eval", folder / "eval.npz", "--metric", EXAMPLES / "metric.py:accuracy", "--scheme", "mixed",
            "--repeats", 20, "-o", out, *extra)


def test_mixed_within_accuracy_budget_end_to_end(tmp_path):
    out = tmp_path / "cnn"
    fixed = ("--max-drop", "0.3%", "--optional-ops", "all")  # the op set is chosen by timing: fix it to reuse
    result = run(*mixed_args("digits_cnn", out, *fixed))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    mixed = manifest["mixed"]
    assert manifest["budget"]["met"]
    if manifest["delivered"]["precision"] == "float":  # on a CPU where the tiny CNN runs slower in int8
        assert manifest["delivered"]["reason"].startswith("every mixed build measured slower than float")
        assert mixed["chosen"]["ms"] > mixed["chosen"]["float_ms"]
    else:
        assert manifest["delivered"]["precision"] == "mixed"
    assert manifest["fidelity"]["metric"]["drop"] <= 0.003
    assert mixed["iterations"] and all(g["precision"] in ("float", "int8") for g in mixed["groups"])
    assert all(g["ms"] is not None and set(g["nsr"]) == {"float", "int8"} for g in mixed["groups"])
    assert mixed["sensitivity"]["gated_trials"] == len(mixed["groups"])  # int8 trials on the gated model
    assert mixed["frontier"] and mixed["x_axis"] == "ms"
    page = (out / "report.html").read_text()
    assert "<svg" in page and mixed["groups"][0]["name"] in page
    onnx.checker.check_model(str(out / "model.onnx"))
    # the sensitivity table is cached: a second compile measures no one-group build
    again = run(*mixed_args("digits_cnn", tmp_path / "again", *fixed))
    assert again.exit_code == 0, again.output
    second = json.loads((tmp_path / "again/manifest.json").read_text())["mixed"]["sensitivity"]
    assert second["cache_hit"] and not mixed["sensitivity"]["cache_hit"]


def test_size_budget_uses_int4_and_is_checked_on_disk(tmp_path):
    out = tmp_path / "tf"
    float_mb = (EXAMPLES / "digits_transformer/model.onnx").stat().st_size / 1e6
    result = run(*mixed_args("digits_transformer", out, "--size-mb", f"{0.2 * float_mb:.4f}", "--no-measure"))
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = manifest["mixed"]["chosen"]
    assert chosen["precisions"].get("int4", 0) >= 1, chosen
    assert manifest["budget"]["bytes"] == (out / "model.onnx").stat().st_size
    assert result.exit_code == (0 if manifest["budget"]["met"] else 3)
    assert manifest["budget"]["met"]
    assert manifest["mixed"]["x_axis"] == "bytes"
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(out / "model.onnx").graph.node)
    assert session.get_outputs()


def test_unreachable_latency_budget_exits_3_after_bounded_iterations(tmp_path):
    out = tmp_path / "cnn"
    result = run(*mixed_args("digits_cnn", out, "--latency-ms", "0.0001"))
    assert result.exit_code == 3, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    iterations = manifest["mixed"]["iterations"]
    assert 1 <= len(iterations) <= Recipe().mixed_iterations
    assert "latency_ms" in iterations[0]["relaxed"] and not manifest["budget"]["met"]
    assert (out / "report.html").is_file()


def test_mixed_errors_are_one_line(tmp_path):
    folder = EXAMPLES / "digits_cnn"
    base = ("compile", folder / "model.onnx", "-t", HOST_X86, "--calib", folder / "calib.npz",
            "-o", tmp_path / "o")
    for extra, message in ((("--scheme", "mixed"), "needs a budget"), (("--size-mb", "1"), "--scheme mixed"),
                           (("--scheme", "mixed", "--latency-ms", "1", "--no-measure"), "needs latency measured")):
        result = run(*base, *extra)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "o").exists()


def test_profile_attributes_nchwc_kernels_to_their_nodes(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(channels=32, size=32), path)
    times = OnnxRuntime(TARGET).profile(path, {"x": np.zeros((1, 3, 32, 32), np.float32)}, runs=2)
    names = {t.name for t in times}
    assert "conv2" in names and not any(n.endswith("_nchwc") for n in names)


def test_sensitivity_proxy_tracks_measured_figures(tmp_path):
    tables = {}
    for mode in ("measured", "proxy"):
        out = tmp_path / mode
        result = run(*mixed_args("digits_transformer", out, "--max-drop", "1%", "--sensitivity", mode, "--no-measure"))
        assert result.exit_code == 0, result.output
        mixed = json.loads((out / "manifest.json").read_text())["mixed"]
        tables[mode] = {g["name"]: g["nsr"] for g in mixed["groups"]}
        sensitivity = mixed["sensitivity"]
    assert sensitivity["proxy_groups"] and sensitivity["proxy_scale"] > 0
    for name, figures in tables["proxy"].items():
        assert figures.keys() == tables["measured"][name].keys()
        if name not in sensitivity["proxy_groups"]:  # measured in both runs (calibration groups, attention, …)
            assert figures == pytest.approx(tables["measured"][name], rel=1e-6)
        elif "int4" in figures:  # the proxy ranks int4 as noisier than int8, as measured
            measured = tables["measured"][name]
            assert figures["int4"] > figures["int8"] and measured["int4"] > measured["int8"]
    # layer-level figures miss how much of a layer's noise reaches the output, but stay within two decades
    ratios = [tables["proxy"][g][p] / tables["measured"][g][p] for g in sensitivity["proxy_groups"]
              for p in tables["measured"][g] if p != "float"]
    assert len(ratios) >= 4 and all(0.01 < r < 100 for r in ratios), ratios


def test_sensitivity_proxy_measures_layers_inside_if_branches():
    """A layer inside an If branch (a VAD's per-sample-rate branches) has no input the proxy can read: it is
    left to measurement, beside a main-graph layer the proxy serves."""
    w, v = (numpy_helper.from_array(np.random.default_rng(seed).standard_normal((8, 8)).astype(np.float32), name)
            for seed, name in ((0, "w"), (1, "v")))
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "v"], ["b"], name="branch_mm")], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 8])])
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="main_mm"),
                        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch, name="if")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                        helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w, v])
    rng = np.random.default_rng(1)
    feeds = [type("Feed", (), {"inputs": {"x": rng.standard_normal((1, 8)).astype(np.float32),
                                          "cond": np.array(True)}}) for _ in range(4)]
    groups = [Group(name, (name,), "MatMul", ("float", "int8")) for name in ("main_mm", "branch_mm")]
    ranges = {name: (-3.0, 3.0) for name in ("x", "h", "b")}
    proxy = sensitivity.proxy_nsr(ir.from_proto(proto), groups, feeds, ranges, TARGET)
    assert list(proxy) == ["main_mm"] and 0 < proxy["main_mm"]["int8"] < 0.01


def test_tensorrt_target_mixes_fp16_and_int8_by_size_without_measuring(tmp_path):
    out = tmp_path / "orin"
    folder = EXAMPLES / "digits_cnn"
    result = run("compile", folder / "model.onnx", "-t", "jetson-orin", "--calib", folder / "calib.npz", "--eval",
                 folder / "eval.npz", "--metric", EXAMPLES / "metric.py:accuracy", "--scheme", "mixed",
                 "--max-drop", "0.3%", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    mixed = manifest["mixed"]
    assert mixed["x_axis"] == "bytes" and manifest["latency"]["measured"] is False
    precisions = {g["precision"] for g in mixed["groups"]}
    assert "float" not in precisions and precisions <= {"fp16", "int8"}  # fp16 is smaller than float and ~lossless
    assert manifest["delivered"]["bytes"] < 0.6 * manifest["delivered"]["float_bytes"]
    options = manifest["deploy"]["onnxruntime"]["provider_options"]["TensorrtExecutionProvider"]
    assert options.get("trt_int8_enable", False) == ("int8" in precisions)


def test_int16_activations_are_wider_and_more_accurate_than_int8(tmp_path):
    proto = mlp_model()
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    errors = {}
    for precision in ("int8", "int16"):
        model = ir.serde.deserialize_model(proto)
        ConvertOpsetPass(21)(model)
        everything_float = {n: "float" for n in ("mm1", "mm2", "mm4")}
        insert = InsertQDQPass(FULL_RANGE_RULES, ranges_for(proto), precisions=everything_float | {"mm3": precision})
        insert(model)
        assert insert.decisions["mm3"].precision == precision
        zero_points = {n.inputs[0].name: n.inputs[2].const_value.dtype for n in model.graph
                       if n.op_type == "QuantizeLinear"}
        expected = ir.DataType.UINT16 if precision == "int16" else ir.DataType.UINT8
        assert zero_points["r"] == zero_points["b"] == expected  # what mm3 reads and writes
        path = tmp_path / f"{precision}.onnx"
        ir.save(model, path)
        errors[precision] = output_nsr([[ref]], [[ort.InferenceSession(str(path)).run(None, {"x": x})[0]]])
    assert 0 < errors["int16"] < 0.9 * errors["int8"]  # the int8 weights (W8A16) still bound the gain


def test_measurement_rejects_int16_where_the_target_has_no_16_bit_kernels(tmp_path):
    text = (EXAMPLES.parent / f"targets/{HOST_X86}.toml").read_text()
    text = text.replace("reduce_range = true", "reduce_range = false")  # 8-bit weights: int16 gains visibly
    target = tmp_path / "x86-int16.toml"
    target.write_text(text.replace('candidates = ["float", "int8", "int4"]', 'candidates = ["float", "int8", "int16"]'))
    out = tmp_path / "tf"
    folder = EXAMPLES / "digits_cnn"
    result = run("compile", folder / "model.onnx", "-t", target, "--calib", folder / "calib.npz", "--eval",
                 folder / "eval.npz", "--scheme", "mixed", "--max-drop", "1%", "--repeats", 20,
                 "--optional-ops", "all", "-o", out)  # static int8 (a dynamic int8 layer pays its run-time scales)
    assert result.exit_code == 0, result.output
    mixed = json.loads((out / "manifest.json").read_text())["mixed"]
    for g in mixed["groups"]:
        assert g["nsr"]["int16"] < g["nsr"]["int8"]
        # ORT's CPU EP has no 16-bit kernels (float plus conversions): int8 is faster wherever the budget allows it
        assert g["precision"] != "int16"


def test_int4_builds_of_an_opset_17_model_convert_attribute_axes(tmp_path):
    """A legacy-export LayerNorm (ReduceMean with an axes attribute, opset 17) before int4 MatMuls: the int4
    builds need opset 21, where axes is an input. The model is converted, not relabelled, so every candidate
    loads in ONNX Runtime."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1, name="ln_mean"),
             helper.make_node("Sub", ["x", "mean"], ["centered"], name="ln_sub"),
             helper.make_node("MatMul", ["centered", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.2, n) for n in ("w1", "w2")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64])], inits, opset=17)
    onnx.save(proto, tmp_path / "ln.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(12):
        np.savez(feeds / f"{i}.npz", x=rng.standard_normal((1, 16, 64)).astype(np.float32))
    out = tmp_path / "out"
    result = run("compile", tmp_path / "ln.onnx", "-t", HOST_X86, "--calib", feeds, "-o", out, "--scheme", "mixed",
                 "--size-mb", "0.007", "--no-measure")
    assert result.exit_code in (0, 3), result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mixed"]["chosen"]["precisions"].get("int4", 0) >= 1
    delivered = onnx.load(str(out / "model.onnx"))
    assert {o.domain or "": o.version for o in delivered.opset_import}[""] == 21
    reduce = next(n for n in delivered.graph.node if n.op_type == "ReduceMean")
    assert not [a for a in reduce.attribute if a.name == "axes"] and len(reduce.input) == 2
    ort.InferenceSession(str(out / "model.onnx"))
