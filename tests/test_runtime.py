import time

import numpy as np
import onnx
import pytest

from conftest import HOST_X86, conv_model
from edgeq.runtimes import base
from edgeq.runtimes.base import MAX_ROUNDS, MIN_ROUNDS, Latency, measure_interleaved
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import load_target
from test_insert_qdq import quantize


def test_interleaved_measurement_orders_candidates_correctly():
    lat = measure_interleaved({"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.003)},
                              warmup=1, repeats=10)
    assert lat["fast"].median_ms < lat["slow"].median_ms
    assert lat["fast"].min_ms <= lat["fast"].median_ms <= lat["fast"].p90_ms
    # at least `repeats` rounds, and as many as fill MIN_SECONDS per candidate: here 0.5 s / 2 ms a run
    assert lat["slow"].runs == lat["fast"].runs and 100 < lat["slow"].runs < MAX_ROUNDS


def test_slow_models_are_timed_within_a_time_budget(monkeypatch):
    monkeypatch.setattr(base, "MAX_SECONDS", 0.05)  # a round (0.04 s) near the budget: a one-second model's case
    calls = {"a": 0, "b": 0}

    def run(name):
        calls[name] += 1
        time.sleep(0.02)

    lat = measure_interleaved({"a": lambda: run("a"), "b": lambda: run("b")}, warmup=5, repeats=50)
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
