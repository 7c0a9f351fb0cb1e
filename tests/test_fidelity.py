import numpy as np
import pytest

from edgeq.errors import UserError
from edgeq.fidelity import FidelityMeter, accuracy_drop, load_metric


def test_figures_match_their_definitions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10)).astype(np.float32)
    test = ref + rng.standard_normal((4, 10)).astype(np.float32) * 0.01
    meter = FidelityMeter(["y"])
    meter.update([ref], [test])
    out = meter.summary()["outputs"]["y"]
    r, t = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    assert out["cosine"] == pytest.approx(r @ t / np.linalg.norm(r) / np.linalg.norm(t))
    assert out["sqnr_db"] == pytest.approx(10 * np.log10((r ** 2).sum() / ((r - t) ** 2).sum()))
    assert out["max_abs_error"] == pytest.approx(np.abs(r - t).max())
    assert out["top1_agreement"] == 1.0


def test_worst_channel_exposes_a_failure_that_cosine_hides():
    """A detector-like output: 4 large box channels and 2 small class channels; class channel 5 is wrecked."""
    rng = np.random.default_rng(1)
    ref = np.concatenate([rng.standard_normal((1, 4, 100)) * 100, rng.standard_normal((1, 2, 100)) * 0.1], axis=1)
    test = ref.copy()
    test[:, 5] = rng.standard_normal(100) * 0.1
    meter = FidelityMeter(["det"])
    meter.update([ref.astype(np.float32)], [test.astype(np.float32)])
    out = meter.summary()["outputs"]["det"]
    assert out["cosine"] > 0.9999
    assert out["worst_channels"][0]["channel"] == 5 and out["worst_channels"][0]["sqnr_db"] < 3


def test_user_metric_and_drop(tmp_path):
    (tmp_path / "m.py").write_text("def first(outputs, feeds):\n    return float(outputs[0]['y'].ravel()[0])\n")
    metric = load_metric(f"{tmp_path / 'm.py'}:first")
    meter = FidelityMeter(["y"], keep_for_metric=True)
    meter.update([np.array([[2.0, 0.0]], np.float32)], [np.array([[1.5, 0.0]], np.float32)])
    summary = meter.summary(metric)
    assert summary["metric"] == {"float": 2.0, "candidate": 1.5, "drop": 0.5}
    assert accuracy_drop(summary) == 0.5


@pytest.mark.parametrize("spec", ["nocolon", "missing_module_xyz:fn", "os:not_a_function"])
def test_bad_metric_specs(spec):
    with pytest.raises(UserError):
        load_metric(spec)


def test_kept_reference_outputs_give_the_same_summary_and_have_a_size_cap(tmp_path, conv_onnx, conv_feeds):
    from edgeq.calibration_data import CalibrationData, input_specs
    from edgeq.fidelity import compare_models, reference_outputs
    from edgeq.model_io import load_model
    from edgeq.runtimes.onnxruntime import OnnxRuntime
    from edgeq.target import load_target
    from test_insert_qdq import quantize

    import onnx

    runtime = OnnxRuntime(load_target("x86-64"))
    feeds = CalibrationData.from_path(conv_feeds, input_specs(load_model(conv_onnx)))
    quantized = tmp_path / "q.onnx"
    onnx.save(quantize(onnx.load(conv_onnx))[0], quantized)
    kept = reference_outputs(runtime, conv_onnx, feeds, max_bytes=1 << 20)
    assert len(kept) == len(feeds)
    assert compare_models(runtime, conv_onnx, quantized, feeds, reference=kept) == \
        compare_models(runtime, conv_onnx, quantized, feeds)
    assert reference_outputs(runtime, conv_onnx, feeds, max_bytes=100) is None  # 10 floats per feed: 40 bytes
