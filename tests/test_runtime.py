import time

import numpy as np
import onnx
import pytest

from conftest import HOST_X86, conv_model
from edgeq.devices import agent
from edgeq.devices.agent import MAX_ROUNDS, MIN_ROUNDS
from edgeq.runtimes.base import Latency, measure_interleaved
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import load_target
from test_insert_qdq import quantize


def test_interleaved_measurement_orders_candidates_correctly():
    lat = measure_interleaved({"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.003)},
                              warmup=1, repeats=10, here=False)
    assert lat["fast"].median_ms < lat["slow"].median_ms
    assert lat["fast"].min_ms <= lat["fast"].median_ms <= lat["fast"].p90_ms
    # more than `repeats` rounds: as many as fill MIN_SECONDS per candidate at the warm-up's pace (0.5 s / 2 ms a
    # run on an idle machine: 125; a loaded one sleeps longer, so the bound is the repeats asked for)
    assert lat["slow"].runs == lat["fast"].runs and 10 < lat["slow"].runs < MAX_ROUNDS


def test_slow_models_are_timed_within_a_time_budget(monkeypatch):
    monkeypatch.setattr(agent, "MAX_SECONDS", 0.05)  # a round (0.04 s) near the budget: a one-second model's case
    calls = {"a": 0, "b": 0}

    def run(name):
        calls[name] += 1
        time.sleep(0.02)

    lat = measure_interleaved({"a": lambda: run("a"), "b": lambda: run("b")}, warmup=5, repeats=50, here=False)
    assert lat["a"].runs == lat["b"].runs == MIN_ROUNDS  # 0.05 s fill 2 runs each; never fewer than MIN_ROUNDS
    assert calls["a"] <= 3 + MIN_ROUNDS  # and the warm-up stopped early (2 rounds of 5)


def test_latency_statistics():
    lat = Latency.from_samples([0.001, 0.002, 0.003, 0.004])
    assert lat.min_ms == pytest.approx(1.0) and lat.median_ms == pytest.approx(2.5)


def test_profile_maps_fused_integer_kernels_back_to_original_nodes(tmp_path):
    quant, insert = quantize(conv_model())
    path = tmp_path / "q.onnx"
    onnx.save(quant, path)
    runtime = OnnxRuntime(load_target(HOST_X86))
    times = runtime.profile(path, {"x": np.zeros((1, 3, 16, 16), np.float32)}, runs=5)
    by_name = {t.name: t for t in times}
    assert by_name["conv1"].op_type == "QLinearConv" and by_name["conv2"].op_type == "QLinearConv"
    assert by_name["fc"].op_type == "QGemm"
    assert all(t.ms >= 0 for t in times)
    assert not list(tmp_path.glob("*profile*.json"))  # trace files are cleaned up


def test_sessions_are_kept_for_a_file_until_it_changes(tmp_path):
    """The float model and a candidate load once across latency and fidelity runs; a rewritten file loads anew."""
    runtime = OnnxRuntime(load_target(HOST_X86))
    path, other = tmp_path / "m.onnx", tmp_path / "other.onnx"
    onnx.save(conv_model(seed=0), path)
    onnx.save(conv_model(seed=1), other)
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    first = runtime.session(path)
    assert runtime.session(other) is not first and runtime.session(path) is first
    before = first.run(feed)[0]
    onnx.save(conv_model(seed=2), path)  # same path and size, other weights
    again = runtime.session(path)
    assert again is not first and not np.allclose(again.run(feed)[0], before)


def test_a_batch_on_one_device_is_one_interleaved_run(tmp_path, monkeypatch):
    """Candidates paired with the same float model are measured in one run: float once a round, not once a pair."""
    runtime = OnnxRuntime(load_target(HOST_X86))
    paths = [tmp_path / f"m{seed}.onnx" for seed in range(3)]
    for seed, path in enumerate(paths):
        onnx.save(conv_model(seed=seed), path)
    calls = []
    measure = runtime.device.measure

    def spy(models, *args):
        calls.append(dict(models))
        return measure(models, *args)

    monkeypatch.setattr(runtime.device, "measure", spy)
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    first, second = runtime.measure_many([{"float": paths[0], "int8": paths[1]}, {"float": paths[0], "int8": paths[2]}],
                                         feed, warmup=1, repeats=3)
    assert len(calls) == 1 and sorted(calls[0].values()) == sorted(paths)
    assert first["float"] is second["float"] and first["int8"] is not second["int8"]
    assert first["int8"].runs == second["int8"].runs == first["float"].runs >= 3
