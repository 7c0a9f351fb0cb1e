"""The default fidelity guard: output kinds read from the float outputs, thresholds per kind, and the fewest
groups with most noise per millisecond saved returned to float when uniform int8 misses it."""

import json

import numpy as np
import onnxruntime as ort
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import HOST_X86, make_model
from edgeq import guard
from edgeq.calibration_data import Feed
from edgeq.detections import set_outputs
from edgeq.cli import main
from edgeq.fidelity import FidelityMeter, OutputHints, feature_outputs, open_axis_outputs, padding_of
from edgeq.passes.gate_qdq import GateQDQPass
from edgeq.passes.normalize import NormalizePass
from edgeq.pipeline import GUARD_BUILDS, REPAIR_GROUPS, RETURNED_BY_GUARD
from edgeq.ptq_stage import PtqStage
from edgeq.recipe import Recipe
from edgeq.search.op_sets import AFTER_GUARD

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Every test draws the same numbers whichever tests ran before it in its worker (pytest-xdist spreads them
    differently from run to run: an outlier model's weights, and a no-face map that grew a face, once did)."""
    global RNG
    RNG = np.random.default_rng(0)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("make,kind", [
    (lambda: _softmax(RNG.standard_normal((1, 7, 30))), "classes"),
    (lambda: 1 / (1 + np.exp(-RNG.standard_normal((1, 50, 10)))), "scores"),
    # a probability map no value of which reaches the decision (a VAD on silence): no decision to judge
    (lambda: 0.4 / (1 + np.exp(-RNG.standard_normal((1, 50, 10)))), "map"),
    (lambda: _unit(RNG.standard_normal((1, 2048))), "embedding"),
    (lambda: RNG.standard_normal((1, 1000)) * 4, "logits"),
    (lambda: RNG.standard_normal(()) + 3, "values"),
    (lambda: RNG.standard_normal((1, 3)) + 3, "values"),  # three quality scores: numbers, not logits
    (lambda: RNG.standard_normal((10, 4)), "values"),  # ten samples' box offsets: still four numbers each
    (lambda: _softmax(RNG.standard_normal((1, 6, 5, 2)) * 3), "segments"),  # a per-pixel face/no-face map
    (lambda: _softmax(RNG.standard_normal((1, 6, 5, 2)) + [4, 0]), "map"),  # …where float finds no face
    (lambda: RNG.standard_normal((1, 3, 16, 16)), "map"),
    (lambda: RNG.integers(0, 30, (1, 19)), "indices"),
])
def test_output_kinds_are_read_from_the_reference(make, kind):
    meter = FidelityMeter(["y"])
    for _ in range(3):
        ref = make()
        ref = ref.astype(np.float32) if ref.dtype.kind == "f" else ref
        meter.update([ref], [ref])
    out = meter.summary()["outputs"]["y"]
    assert out["kind"] == kind
    assert guard.check(meter.summary())["met"]  # the reference holds its own guard


@pytest.mark.parametrize("name,kind", [("logits", "logits"), ("cls_Logits", "logits"), ("mos", "values")])
def test_few_values_named_logits_are_a_classifiers(name, kind):
    """A 3-class head's logits are judged by their argmax, as a classifier's, where the model names them logits
    (Hugging Face's classification heads do); three unnamed numbers stay values (a quality regressor's)."""
    ref = np.array([[4.0, -3.0, 1.5]], np.float32)
    meter = FidelityMeter([name])
    meter.update([ref], [ref + np.float32(0.1)])  # 29.6 dB: under the values' 35 dB, over the logits' 20 dB
    result = guard.check(meter.summary())
    assert result["outputs"][name]["kind"] == kind
    assert result["met"] is (kind == "logits")


def test_per_position_logits_named_so_are_judged_by_their_argmax():
    """A language model's [batch, positions, vocabulary] logits: 3 of 100 positions predicting another token is a
    miss (0.97 agreement), though as a map of numbers (SQNR well over 18 dB) it would hold."""
    ref = (RNG.standard_normal((1, 100, 50)) * 3).astype(np.float32)
    test = ref.copy()
    for position in (5, 50, 95):
        top2 = np.argsort(ref[0, position])[-2:]
        test[0, position, top2] = test[0, position, top2[::-1]]
    for name, kind, met in (("logits", "logits", False), ("hidden_states", "map", True)):
        meter = FidelityMeter([name])
        meter.update([ref], [test])
        result = guard.check(meter.summary())
        assert result["outputs"][name]["kind"] == kind and result["met"] is met
    assert meter.summary()["outputs"][name]["sqnr_db"] > 25


def test_thresholds_by_kind():
    ref = _softmax(RNG.standard_normal((1, 200, 30))).astype(np.float32)
    flipped = ref.copy()
    flipped[0, :4] = flipped[0, :4, ::-1]  # 4 of 200 positions decide otherwise: agreement 0.98
    meter = FidelityMeter(["p"])
    meter.update([ref], [flipped])
    result = guard.check(meter.summary())
    assert not result["met"] and result["outputs"]["p"]["kind"] == "classes"
    assert result["outputs"]["p"]["checks"][0]["value"] == pytest.approx(0.98)
    noisy = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    for noise, met in ((0.1, True), (0.2, False)):  # 20 dB and 14 dB against the map kind's 18 dB
        meter = FidelityMeter(["m"])
        meter.update([noisy], [noisy + noise * RNG.standard_normal(noisy.shape).astype(np.float32)])
        assert guard.check(meter.summary())["met"] is met
    scores = np.array([[2.9, 2.7, 2.3]], np.float32)  # a [1, 3] quality-score head: 32 dB missed its task
    for error, met in ((0.014, True), (0.025, False)):  # relative error: 37.1 dB and 32.0 dB against 35 dB
        meter = FidelityMeter(["s"])
        meter.update([scores], [scores * (1 + error * np.array([[1, -1, 1]], np.float32))])
        assert guard.check(meter.summary())["met"] is met
    nan = noisy.copy()
    nan[0, 0, 0, 0] = np.nan
    meter = FidelityMeter(["m"])
    meter.update([noisy], [nan])
    assert not guard.check(meter.summary())["met"]


def test_a_class_map_is_judged_by_its_foreground_not_by_every_pixel():
    """A [1, 40, 40, 2] face/no-face map (MTCNN's proposal net) with a 10×10 face: 6 background pixels flip
    at the face's edge — every map has a pixel that flips, yet the face is kept (IoU 100/106); losing a
    third of the face is losing it."""
    logits = np.zeros((1, 40, 40, 2))
    logits[0, :, :, 0] = 4.0
    logits[0, 10:20, 10:20, :] = [0.0, 4.0]
    ref = _softmax(logits).astype(np.float32)
    for rows, met in ((slice(20, 21), True), (slice(13, 20), False)):
        test = logits.copy()
        test[0, rows, 10:16] = [0.0, 4.0] if rows.start == 20 else [4.0, 0.0]
        meter = FidelityMeter(["prob"])
        for _ in range(3):
            meter.update([ref], [_softmax(test).astype(np.float32)])
        out = meter.summary()["outputs"]["prob"]
        assert out["kind"] == "segments" and "sequence_agreement" not in out
        assert out["decision_agreement"] == pytest.approx(100 / 106 if met else 58 / 100)
        assert guard.check(meter.summary())["met"] is met



@pytest.mark.parametrize("lost,met", [(1, True), (30, False)])
def test_a_frame_classifiers_frames_are_judged_by_their_events_not_as_a_sequence(lost, met):
    """[1, 300, 4] per-frame softmax, 100 frames of an event in background (a seizure detector's half-second
    segments): one frame at the event's edge flipping on every feed leaves no sequence equal, yet the event is
    kept (IoU 99/100); losing 30 frames of it is losing it. A decoder's tokens, which rarely repeat, stay a
    sequence: one flip each fails them."""
    logits = np.zeros((1, 300, 4))
    logits[0, :, 2] = 5.0
    logits[0, 100:200] = [0, 0, 0, 5.0]
    test = logits.copy()
    test[0, 100:100 + lost] = [0, 0, 5.0, 0]
    meter = FidelityMeter(["probs"])
    for _ in range(3):
        meter.update([_softmax(logits).astype(np.float32)], [_softmax(test).astype(np.float32)])
    out = meter.summary()["outputs"]["probs"]
    assert out["kind"] == "segments" and out["decision_agreement"] == pytest.approx((100 - lost) / 100)
    assert guard.check(meter.summary())["met"] is met
    tokens = np.full((1, 300, 4), 0.0)
    tokens[0, np.arange(300), RNG.integers(0, 4, 300)] = 5.0
    flipped = tokens.copy()
    flipped[0, 150] = np.roll(tokens[0, 150], 1)
    meter = FidelityMeter(["probs"])
    for _ in range(3):
        meter.update([_softmax(tokens).astype(np.float32)], [_softmax(flipped).astype(np.float32)])
    assert meter.summary()["outputs"]["probs"]["kind"] == "classes"
    assert not guard.check(meter.summary())["met"]

@pytest.mark.parametrize("noise,met", [(0.05, True), (0.5, False)])
def test_an_output_shaped_like_its_input_is_judged_by_the_change_it_makes(noise, met):
    """An anomaly autoencoder's reconstruction of [8, 640] log-mel frames (values -40..40, float's change to them
    about ±2 dB): its argmax is the loudest bin of near-equal ones, which a little noise flips, and its own power
    hides an error as large as the change, which the anomaly score (the reconstruction error) is made of."""
    frames = RNG.uniform(-40, 40, (8, 640)).astype(np.float32)
    frames[:, :64] = 40.0  # a run of equally loud bins: any noise moves the argmax
    reconstruction = (frames + RNG.normal(0, 2, frames.shape)).astype(np.float32)
    candidate = (reconstruction + RNG.normal(0, 2 * noise, frames.shape)).astype(np.float32)
    meter = FidelityMeter(["reconstruction"])
    for _ in range(3):
        meter.update([reconstruction], [candidate], Feed({"frames": frames}, {}, "f"))
    out = meter.summary()["outputs"]["reconstruction"]
    assert out["kind"] == "change" and out["sqnr_db"] > 25  # 22 dB more than the change's own SQNR, either way
    assert out["change_sqnr_db"] == pytest.approx(-20 * np.log10(noise), abs=0.5)
    assert guard.check(meter.summary())["met"] is met
    meter = FidelityMeter(["reconstruction"])  # without its input it is a [batch, 640] output: logits
    meter.update([reconstruction], [candidate])
    assert meter.summary()["outputs"]["reconstruction"]["kind"] == "logits"


def test_a_denoiser_compiles_int8_judged_by_the_change_it_makes(tmp_path):
    """x + a small learned correction (a residual denoiser, an autoencoder's reconstruction), its input's loudest
    bins equal: compiled with no flags, the output is judged as the change it makes and int8 is delivered —
    judged as logits, the equal bins' argmax would decide."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((128, 64)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((64, 128)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["correction"], name="dec"),
             helper.make_node("Add", ["x", "correction"], ["denoised"], name="residual")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 128])],
                       [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["n", 128])],
                       [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(model, tmp_path / "m.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(30):
        x = rng.standard_normal((16, 128)).astype(np.float32)
        x[:, :8] = 3.0  # equally loud bins
        np.savez(feeds / f"{i:02d}.npz", x=x)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-t", HOST_X86, "--calib", str(feeds),
                                       "--no-measure", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["fidelity"]["outputs"]["denoised"]["kind"] == "change"
    assert manifest["fidelity"]["guard"]["met"] and manifest["delivered"]["precision"] == "int8"


@pytest.mark.parametrize("noise,met", [(0.02, True), (1.0, False)])
def test_a_forecast_is_judged_by_its_shape_not_by_the_position_of_its_peak(noise, met):
    """[8 series, 96 steps] forecasts: a daily swing of ±3 on levels of 20–60. Its argmax is the peak's step,
    which a little noise moves to the step beside it; an error as large as the swing hides under the level
    (its raw SQNR stays above 18 dB), not under the shape. Class logits, in any class order, stay logits."""
    steps = np.arange(96)
    forecast = (RNG.uniform(20, 60, (8, 1)) + 3 * np.sin(2 * np.pi * steps / 24 + RNG.uniform(0, 6, (8, 1)))
                ).astype(np.float32)
    candidate = (forecast + RNG.normal(0, 3 * noise, forecast.shape)).astype(np.float32)
    meter = FidelityMeter(["forecast"])
    meter.update([forecast], [candidate])
    out = meter.summary()["outputs"]["forecast"]
    assert out["kind"] == "curve" and out["sqnr_db"] > 18 + 4  # the level alone would hold either
    assert guard.check(meter.summary())["met"] is met
    logits = RNG.normal(0, 3, (8, 96)).astype(np.float32)
    meter = FidelityMeter(["forecast"])
    meter.update([logits], [logits])
    assert meter.summary()["outputs"]["forecast"]["kind"] == "logits"


def _decoded(margins, changes):
    """Softmax over 30 classes per position: class 0 leads class 1 by ``margins`` (logits), the rest far
    behind; ``changes`` are added to class 0's logit."""
    logits = np.full(margins.shape + (30,), -8.0)
    logits[..., 0], logits[..., 1] = margins + changes, 0.0
    return _softmax(logits).astype(np.float32)


@pytest.mark.parametrize("confident_change,met", [(1.0, False), (0.1, True)])
def test_a_sequence_is_judged_by_the_changes_its_thin_margins_could_take(confident_change, met):
    """Six decoded sequences of 100 positions, one thin margin (0.3) each: no position flips, yet when the
    confident positions' margins move by ±1 the thin ones would flip about half the time."""
    margins = np.full((6, 1, 100), 8.0)
    margins[:, :, 50] = 0.3
    changes = np.where(np.arange(100) % 2, confident_change, -confident_change) * np.ones((6, 1, 100))
    changes[:, :, 50] = 0.25
    meter = FidelityMeter(["tokens"])
    for m, c in zip(margins, changes):
        meter.update([_decoded(m, 0 * c)], [_decoded(m, c)])
    out = meter.summary()["outputs"]["tokens"]
    assert out["decision_agreement"] == 1.0
    assert (out["sequence_agreement"] < 0.6) is not met and (out["sequence_agreement"] == 1.0) is met
    assert guard.check(meter.summary())["met"] is met
    meter = FidelityMeter(["p"])  # [batch, classes]: no positions, no sequence figure
    meter.update([_decoded(margins[0, 0, :4], 0)], [_decoded(margins[0, 0, :4], 1.0)])
    assert "sequence_agreement" not in meter.summary()["outputs"]["p"]


@pytest.mark.parametrize("samples,met", [(50, False), (500, True)])
def test_a_sequence_agreement_from_few_samples_is_held_to_its_lower_bound(samples, met):
    """One sample in 50 has a thin margin (0.3) that a quarter of the measured margin changes would overturn:
    the expected share of samples agreeing everywhere is 0.995 at any count, but on 50 samples the lower bound
    of its 90% interval is below the guard's 0.99, on 500 above it."""
    margins = np.full((samples, 1, 100), 8.0)
    margins[::50, :, 50] = 0.3
    changes = np.where(np.arange(100) % 4 == 0, -1.0, 1.0) * np.ones((samples, 1, 100))
    changes[:, :, 50] = 0.0
    meter = FidelityMeter(["tokens"])
    for m, c in zip(margins, changes):
        meter.update([_decoded(m, 0 * c)], [_decoded(m, c)])
    out = meter.summary()["outputs"]["tokens"]
    assert out["decision_agreement"] == 1.0 and 0.985 < out["sequence_agreement"] < 0.995
    assert guard.check(meter.summary())["met"] is met


def _frames(decided, runner_up, margin):
    """Logits over 6 classes per frame: ``decided`` leads ``runner_up`` by ``margin``, the rest far behind."""
    logits = np.full((1, len(decided), 6), -6.0)
    logits[0, np.arange(len(decided)), runner_up] = 0.0
    logits[0, np.arange(len(decided)), decided] = margin
    return logits


def test_ctc_frames_are_judged_by_their_decoded_symbols():
    """A CTC recognizer's frames ("a b b a" with blanks, class 0), a near tie at each character's edge: int8
    moving an edge into the blank beside it keeps the decoded text, and the edges whose flip would not change
    it do not count against the expected agreement (frame by frame, ~12 thin edges per line would); reading a
    gap's blank as a new character changes it (on 1 line of 40: sequences 0.975). A decoder whose end padding
    only trails, and a tagger whose labels sit at its token input's positions, are judged frame by frame."""
    line = np.array([0, 0, 1, 1, 0, 2, 2, 2, 0, 0, 2, 0, 1, 1, 0, 0])
    runner = np.where(line == 0, 1, 0)
    edges = (np.diff(line, prepend=0) != 0) | (np.diff(line, append=0) != 0)
    ref = _frames(line, runner, np.where(edges, 0.1, 5.0))
    edge_moved, inserted = ref.copy(), ref.copy()
    edge_moved[0, 3, 0] = 0.2  # "b b" → "b ·": still "a b b a"
    inserted[0, 9, 3] = 0.2  # a gap's blank read as a new character
    for test, met in ((edge_moved, True), (inserted, False)):
        meter = FidelityMeter(["probs"])
        for line_index in range(40):  # the one flip is on one line of 40
            meter.update([_softmax(ref).astype(np.float32)], [_softmax(test if line_index == 7 else ref)
                                                              .astype(np.float32)])
        out = meter.summary()["outputs"]["probs"]
        assert out["kind"] == "classes" and out["ctc_blank"] == 0
        assert out["decision_agreement"] == pytest.approx(1.0 if met else 1 - 1 / 160)  # 1 of 160 symbols edited
        assert (out["sequence_agreement"] >= 0.99) is met
        assert guard.check(meter.summary())["met"] is met
    uniform = ref.copy()
    uniform[0, -1] = 0.0  # a step past the end: no decision, though any noise would "flip" its argmax
    meter = FidelityMeter(["probs"])
    for line_index in range(40):
        noise = 0.01 * np.random.default_rng(line_index).standard_normal(ref.shape)
        meter.update([_softmax(uniform).astype(np.float32)], [_softmax(uniform + noise).astype(np.float32)])
    out = meter.summary()["outputs"]["probs"]
    assert out["decision_agreement"] == 1.0 and out["sequence_agreement"] >= 0.99
    trailing = np.array([3, 1, 1, 4, 2, 5] + [0] * 10)  # a decoder's tokens, then its padding
    tokens = type("Feed", (), {"inputs": {"ids": np.arange(16)[None] + 5}})
    for decided, feed in ((trailing, None), (line, tokens)):
        moved = decided.copy()
        moved[2] = 0
        meter = FidelityMeter(["probs"])
        meter.update([_softmax(_frames(decided, np.where(decided == 0, 1, 0), 5.0)).astype(np.float32)],
                     [_softmax(_frames(moved, np.where(moved == 0, 1, 0), 5.0)).astype(np.float32)], feed)
        out = meter.summary()["outputs"]["probs"]
        assert "ctc_blank" not in out and out["decision_agreement"] == pytest.approx(15 / 16)


def test_an_output_named_a_hidden_state_is_read_neither_as_ctc_frames_nor_as_logits():
    """A Whisper encoder's last_hidden_state: a sinusoidal position feature (the last) wins every other frame,
    between other features, so by values alone it reads as CTC frames and int8 "lost" its sequences; named as a
    hidden state it is a map (SQNR). A pooled [batch, D] sentence embedding is an embedding (cosine), not logits."""
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((1, 40, 16)).astype(np.float32)
    frames[0, ::2, -1] = 5.0
    pooled = rng.standard_normal((2, 64)).astype(np.float32)
    kinds = {}
    for name, ref in (("output", frames), ("last_hidden_state", frames), ("pooled", pooled),
                      ("sentence_embedding", pooled)):
        meter = FidelityMeter([name])
        for _ in range(4):
            meter.update([ref], [ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)])
        kinds[name] = meter.summary()["outputs"][name]["kind"]
    assert kinds == {"output": "classes", "last_hidden_state": "map", "pooled": "logits",
                     "sentence_embedding": "embedding"}


def test_outputs_made_by_a_normalization_are_features_whatever_their_name(tmp_path):
    """An encoder's last LayerNormalization (through a Transpose) and a face embedding's last BatchNormalization
    (which normalize folds into its Gemm) make features, recorded before the fold; a projection's output does not.
    Given as features, an unnamed hidden state is a map and a [batch, D] vector an embedding."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(16, np.float32), "g"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b"),
             numpy_helper.from_array(np.ones(16, np.float32), "v"),
             numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "fc_b"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "bn_scale"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bn_bias"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bn_mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "bn_var")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], name="ln", axis=-1),
             helper.make_node("Transpose", ["n"], ["output"], name="t", perm=[1, 0, 2]),
             helper.make_node("ReduceMean", ["h"], ["pooled"], name="pool", axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["fc"], name="fc", transB=1),
             helper.make_node("BatchNormalization", ["fc", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["fc1"],
                              name="bn"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40, 16])],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
                        (("output", [40, 1, 16]), ("fc1", [1, 16]), ("y", [1, 40, 16]))], inits)
    normalized = ir.serde.deserialize_model(model)
    NormalizePass()(normalized)
    assert "BatchNormalization" not in [n.op_type for n in normalized.graph]  # folded into the Gemm
    ir.save(normalized, tmp_path / "m.onnx")
    assert feature_outputs(tmp_path / "m.onnx") == {"output", "fc1"}
    frames = rng.standard_normal((1, 40, 16)).astype(np.float32)
    frames[0, ::2, -1] = 5.0
    vectors = rng.standard_normal((2, 64)).astype(np.float32)
    for name, ref, kind in (("output", frames, "map"), ("fc1", vectors, "embedding")):
        meter = FidelityMeter([name], hints=OutputHints(features=frozenset({"output", "fc1"})))
        meter.update([ref], [ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)])
        assert meter.summary()["outputs"][name]["kind"] == kind


def test_an_output_whose_last_axis_grows_with_the_input_is_not_logits(tmp_path):
    """A resampler's waveform [batch, M] (M declared by a symbol) has more than 16 values per sample, as logits
    do, but its argmax decides nothing: it is a map (a 34.5 dB int8 build was refused at argmax agreement 0.75).
    Declared fixed, the same values are logits; a symbolic axis named logits stays logits."""
    w = numpy_helper.from_array(np.ones((1, 1, 3), np.float32) / 3, "w")
    outputs = [helper.make_tensor_value_info("resampled", TensorProto.FLOAT, ["batch", "M"]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 200]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "vocab"])]
    nodes = [helper.make_node("Unsqueeze", ["x", "one"], ["x3"]), helper.make_node("Conv", ["x3", "w"], ["c"]),
             helper.make_node("Squeeze", ["c", "one"], ["resampled"]),
             helper.make_node("Identity", ["resampled"], ["scores"]), helper.make_node("Identity", ["x"], ["logits"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 202])], outputs,
                       [w, numpy_helper.from_array(np.array([1], np.int64), "one")])
    onnx.save(model, tmp_path / "m.onnx")
    hints = OutputHints.of(tmp_path / "m.onnx")
    assert hints.open_axes == open_axis_outputs(model) == {"resampled", "logits"}
    rng = np.random.default_rng(0)
    meter = FidelityMeter(["resampled", "scores", "logits"], hints=hints)
    for _ in range(4):
        wave = 0.3 * np.sin(np.linspace(0, 20, 200))[None].astype(np.float32) + rng.standard_normal((1, 200)).astype(
            np.float32)  # noise, mostly: no curve (a smooth one would be judged as one, declared fixed or not)
        noisy = wave + 0.01 * rng.standard_normal(wave.shape).astype(np.float32)
        meter.update([wave, wave, wave], [noisy, noisy, noisy])
    kinds = {name: o["kind"] for name, o in meter.summary()["outputs"].items()}
    assert kinds == {"resampled": "map", "scores": "logits", "logits": "logits"}


def test_frame_ids_decided_in_the_graph_are_judged_as_decoded_text():
    """A recognizer that takes the argmax in its graph outputs int64 frame ids [batch, frames], blank between
    symbols: 99% of equal ids (padding frames included) hid lines whose text changed. Read as CTC frames, what
    must agree is the decoded text; a tagger's labels (as many positions as its token input) and a decoder's
    ids with trailing padding stay indices."""
    rng = np.random.default_rng(7)
    frames = np.zeros((4, 60), np.int64)
    for row in frames:
        row[rng.choice(np.arange(1, 59, 3), 12, replace=False)] = rng.integers(1, 90, 12)
    changed = frames.copy()
    changed[1, np.flatnonzero(changed[1])[3]] = 0  # one symbol lost in one line: 1 frame of 240
    meter = FidelityMeter(["ids"])
    for i in range(4):
        meter.update([frames[i:i + 1]], [changed[i:i + 1]])
    ids = meter.summary()["outputs"]["ids"]
    assert ids["kind"] == "classes" and ids["ctc_blank"] == 0
    assert ids["sequence_agreement"] == 0.75 and ids["decision_agreement"] == pytest.approx(1 - 1 / 48)
    tokens = np.ones((1, 60), np.int64)
    tagger = FidelityMeter(["labels"])
    tagger.update([frames[:1]], [changed[:1]], Feed({"input_ids": tokens}, {}, "t"))
    decoder = FidelityMeter(["tokens"])
    decoder.update([np.array([[5, 9, 3, 7, 2, 0, 0, 0]])], [np.array([[5, 9, 3, 7, 2, 0, 0, 0]])])
    assert tagger.summary()["outputs"]["labels"]["kind"] == decoder.summary()["outputs"]["tokens"]["kind"] == \
        "indices"


def test_ctc_logits_time_major_are_judged_as_decoded_frames():
    """A CRNN trained with CTC loss outputs raw logits, time-major ([frames, batch, classes]: a captcha reader's
    [20, 1, 37]); they were judged as a map by SQNR alone. Read with frames and batch swapped (the feed's batch
    is 1), the argmax shows the blank inside the line: judged as CTC frames, like softmax outputs."""
    line = np.array([0, 0, 1, 1, 0, 2, 2, 2, 0, 0, 2, 0, 1, 1, 0, 0])
    runner = np.where(line == 0, 1, 0)
    edges = (np.diff(line, prepend=0) != 0) | (np.diff(line, append=0) != 0)
    ref = _frames(line, runner, np.where(edges, 0.1, 5.0))
    edge_moved, inserted = ref.copy(), ref.copy()
    edge_moved[0, 3, 0] = 0.2
    inserted[0, 9, 3] = 0.2
    image = type("Feed", (), {"inputs": {"image": np.zeros((1, 3, 8, 32), np.float32)}})
    time_major = lambda logits: np.swapaxes(logits, 0, 1).astype(np.float32)
    for test, met in ((edge_moved, True), (inserted, False)):
        meter = FidelityMeter(["logits"])
        for line_index in range(40):
            meter.update([time_major(ref)], [time_major(test if line_index == 7 else ref)], image)
        out = meter.summary()["outputs"]["logits"]
        assert out["kind"] == "classes" and out["ctc_blank"] == 0
        assert out["decision_agreement"] == pytest.approx(1.0 if met else 1 - 1 / 160)
        assert guard.check(meter.summary())["met"] is met
    meter = FidelityMeter(["frames"])  # without the feed the batch is unknown: 16 samples of 6 values each
    meter.update([time_major(ref)], [time_major(inserted)])
    assert meter.summary()["outputs"]["frames"]["kind"] == "values"
    meter = FidelityMeter(["scores"])  # a detector's per-class sigmoid scores with that argmax: still scores
    sigmoid = lambda logits: (1 / (1 + np.exp(-logits))).astype(np.float32)
    meter.update([sigmoid(ref)], [sigmoid(inserted)], image)
    assert meter.summary()["outputs"]["scores"]["kind"] == "scores"


def test_padded_positions_of_a_tagger_are_not_judged():
    """Token ids [1, 16], the last 6 the pad id 0: the tagger's outputs there are near ties that int8 flips
    (a real grapheme-to-phoneme model's 66 of 79 flips); the real positions are confident and unchanged."""
    ids = np.array([[7, 3, 9, 4, 4, 12, 5, 8, 2, 11] + [0] * 6])
    margins = np.where(ids[0] == 0, 0.05, 6.0)[None, :]
    flipped = np.where(ids[0] == 0, -0.2, 0.0)[None, :]
    feed = type("Feed", (), {"inputs": {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}})
    with_feed, without = FidelityMeter(["labels"]), FidelityMeter(["labels"])
    for _ in range(20):
        with_feed.update([_decoded(margins, 0)], [_decoded(margins, flipped)], feed)
        without.update([_decoded(margins, 0)], [_decoded(margins, flipped)])
    judged, everything = (m.summary()["outputs"]["labels"] for m in (with_feed, without))
    assert judged["decision_agreement"] == 1.0 and judged["sequence_agreement"] == 1.0
    assert everything["decision_agreement"] == pytest.approx(10 / 16) and everything["sequence_agreement"] == 0.0
    assert guard.check(with_feed.summary())["met"] and not guard.check(without.summary())["met"]


@pytest.mark.parametrize("inputs, padded", [
    ({"ids": [[5, 6, 7, 0, 0]]}, [3, 4]),
    ({"ids": [[5, 6, 7, 1, 1]], "attention_mask": [[1, 1, 1, 1, 0]]}, [4]),  # a mask decides where there is one
    ({"ids": [[5, 6, 7, 8, 0]]}, []),  # a lone last token is a token
    ({"ids": [[0, 0, 0, 0, 0]]}, []),  # a constant row is not padding
    ({"ids": [[5, 6, 7, 8, 9]], "segments": [[0, 0, 1, 1, 1]]}, []),  # segment ids: fewer distinct values
    ({"image": np.zeros((1, 3, 4, 4), np.float32)}, []),
])
def test_padding_is_read_from_the_token_inputs(inputs, padded):
    found = padding_of({k: np.asarray(v) for k, v in inputs.items()})
    assert (sorted(np.flatnonzero(found[0])) if found is not None else []) == padded


def _outlier_model(tmp_path):
    """x[1, 8, 64] → mm1 → Relu → mm2: feature 0 of x is ±500, so a per-tensor int8 scale for x wipes out
    every other feature (mm1 in int8 ruins the output); mm2's input is ordinary. Its own generator, as
    test_lock builds it too."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    w1[0] *= 0.002  # the outlier feature barely reaches the output
    w2 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])],
                       [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(model, tmp_path / "m.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        x = rng.standard_normal((1, 8, 64)).astype(np.float32)
        x[..., 0] = 500.0 * np.sign(rng.standard_normal((1, 8)))
        np.savez(feeds / f"{i:02d}.npz", x=x)
    return tmp_path / "m.onnx", feeds


def test_the_guard_returns_the_sensitive_group_to_float(tmp_path):
    model, feeds = _outlier_model(tmp_path)
    args = ["compile", str(model), "-t", HOST_X86, "--calib", str(feeds), "--no-measure"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    report = manifest["guard"]
    assert not report["uniform_int8"]["met"] and report["float_groups"] == ["mm1"]
    assert report["sensitivity"]["mm1"] > report["sensitivity"]["mm2"]
    decisions = manifest["quantization"]["decisions"]
    assert not decisions["mm1"]["quantized"] and decisions["mm2"]["quantized"]
    assert decisions["mm1"]["reason"] == RETURNED_BY_GUARD  # not "int8 was slower here"
    assert manifest["delivered"]["precision"] == "int8" and manifest["fidelity"]["guard"]["met"]
    assert len(report["trials"]) <= 2  # uniform int8, then one bisection step for two groups
    auto = manifest["ptq"]["auto"]  # --ptq auto tried GPTQ + bias correction first: it cannot fix an outlier
    assert auto["tried"] == ["gptq", "bias-correction"] and "with_ptq" in report
    unguarded = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "raw"), "--no-guard"])
    assert unguarded.exit_code == 0
    raw = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert raw["quantization"]["decisions"]["mm1"]["quantized"] and raw["guard"]["applied"] is False
    assert raw["fidelity"]["outputs"]["y"]["sqnr_db"] < 18 <= manifest["fidelity"]["outputs"]["y"]["sqnr_db"]


def test_groups_return_to_float_by_noise_per_millisecond_saved():
    from types import SimpleNamespace

    groups = [SimpleNamespace(name=n) for n in ("heavy", "idle", "quiet")]
    nsr = {"heavy": 1e-3, "idle": 5e-4, "quiet": 1e-5}
    assert [g.name for g in guard.keep_order(groups, nsr, None)] == ["quiet", "idle", "heavy"]
    # "idle" saves nothing: kept int8 it costs half heavy's noise for no speed, so it returns to float first
    savings = {"heavy": 2.0, "idle": 0.0, "quiet": 1.0}
    assert [g.name for g in guard.keep_order(groups, nsr, savings)] == ["quiet", "heavy", "idle"]
    assert [g.name for g in guard.keep_order(groups, nsr, dict.fromkeys(nsr, -0.1))] == ["quiet", "idle", "heavy"]


def test_ptq_on_a_guard_miss_repairs_only_the_most_sensitive_groups(tmp_path, monkeypatch):
    """--ptq auto: GPTQ + bias correction are solved for the layers of the REPAIR_GROUPS groups the sensitivity
    table ranks worst, not for every layer (their statistics and solves are most of a large model's guard)."""
    rng = np.random.default_rng(3)
    names = [f"mm{i}" for i in range(1, 6)]
    nodes, inits, source = [], [], "x"
    for i, name in enumerate(names):
        w = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
        if i == 0:
            w[0] *= 0.002  # the ±500 feature of x barely reaches the output: int8 of x loses the rest
        nodes += [helper.make_node("MatMul", [source, f"w{i}"], [f"h{i}"], name=name),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}")]
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        source = f"r{i}"
    nodes[-1] = helper.make_node("Identity", ["h4"], ["y"], name="out")
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])], inits)
    onnx.save(model, tmp_path / "m.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(30):
        x = rng.standard_normal((1, 8, 64)).astype(np.float32)
        x[..., 0] = 500.0 * np.sign(rng.standard_normal((1, 8)))
        np.savez(feeds / f"{i:02d}.npz", x=x)
    asked = []
    after_calibration = PtqStage.after_calibration

    def spy(self, model, calib, techniques=(), only=None):
        asked.append(only)
        return after_calibration(self, model, calib, techniques, only)

    monkeypatch.setattr(PtqStage, "after_calibration", spy)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-t", HOST_X86, "--calib", str(feeds),
                                       "--no-measure", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sensitivity = manifest["guard"]["sensitivity"]
    worst = sorted(sensitivity, key=lambda g: -sensitivity[g])[:REPAIR_GROUPS]
    assert len(sensitivity) == 5 and manifest["ptq"]["auto"]["groups"] == worst
    assert asked[-1] == set(worst) and "mm1" in worst  # one-layer groups: a group's name is its layer's
    assert manifest["fidelity"]["guard"]["met"]


def test_an_integer_output_alone_through_the_measured_op_sets(tmp_path):
    """Token ids out (ArgMax), nothing float: the op-set measurement and the guard judge it by agreement, with
    no SQNR to rank by (a real grapheme-to-phoneme model's only output)."""
    w1 = RNG.standard_normal((64, 64)).astype(np.float32) * 0.2
    w2 = RNG.standard_normal((64, 30)).astype(np.float32) * 0.2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "x"], ["s"], name="residual"),
             helper.make_node("MatMul", ["s", "w2"], ["logits"], name="mm2"),
             helper.make_node("ArgMax", ["logits"], ["ids"], axis=-1, keepdims=0, name="argmax")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                       [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(model, tmp_path / "m.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(20):
        np.savez(feeds / f"{i:02d}.npz", x=RNG.standard_normal((1, 8, 64)).astype(np.float32))
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-t", HOST_X86, "--calib", str(feeds),
                                       "--repeats", "5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len([t for t in manifest["search"]["trials"] if t["strategy"] == "op set"]) > 1
    assert manifest["fidelity"]["outputs"]["ids"]["kind"] == "indices"


def _corrupt_calibration_model(tmp_path) -> None:
    """m.onnx (two MatMuls), calib.npz with 40 corrupt values (60.0) among Gaussian inputs, clean eval.npz."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 48)) * 0.2).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((48, 32)) * 0.2).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    onnx.save(make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])], inits), tmp_path / "m.onnx")
    x = rng.standard_normal(size=(1600, 64)).astype(np.float32)
    calib = x[:800].copy()
    calib.reshape(-1)[rng.choice(calib.size, 40, replace=False)] = 60.0
    np.savez(tmp_path / "calib.npz", x=calib)
    np.savez(tmp_path / "eval.npz", x=x[800:])


def test_a_guard_miss_tries_other_calibration_methods_on_the_most_sensitive_tensors(tmp_path):
    """40 corrupt values (60.0) in Gaussian calibration data: the percentile range keeps them and leaves the real
    inputs a few int8 levels; the entropy range ignores them, and the per-tensor choice finds it."""
    _corrupt_calibration_model(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-t", HOST_X86, "--calib",
                                       str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                                       "--no-measure", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["calibration"]["per_tensor"]["x"] == "entropy"
    tried = {t["label"]: t for t in manifest["search"]["trials"] if t["strategy"] == "ranges"}
    assert tried["fc1: entropy"]["chosen"] and tried["fc1: entropy"]["sqnr_db"] > tried["ranges in use"]["sqnr_db"] + 3
    kept = manifest["guard"]["with_ranges"]
    assert guard.no_worse(kept, manifest["guard"]["uniform_int8"])


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "proxy"])
def test_many_groups_are_ranked_and_the_bisection_still_holds_the_guard(tmp_path, monkeypatch, gated):
    """20 MatMul layers, the first fed an outlier feature: more groups than GUARD_BUILDS. The gated model
    measures every group in one session; where gating is refused, one-layer groups are ranked from their
    input statistics (three measured to scale them). Either way the checked bisection finds the guilty
    layer."""
    def refuse(self, model):
        raise ValueError("refused")

    if not gated:
        monkeypatch.setattr(GateQDQPass, "call", refuse)
    rng = np.random.default_rng(3)
    nodes, inits, value = [], [], "x"
    for i in range(20):
        w = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
        if i == 0:
            w[0] *= 0.002  # the outlier feature barely reaches the output
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [value, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"t{i}"], name=f"tanh{i}"))
        value = f"t{i}"
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
                       [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, 8, 64])], inits)
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((40, 8, 64)).astype(np.float32)
    x[..., 0] = 500.0 * np.sign(rng.standard_normal((40, 8)))
    np.savez(tmp_path / "calib.npz", x=x)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-t", HOST_X86, "--calib",
                                       str(tmp_path / "calib.npz"), "--no-measure", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    report = manifest["guard"]
    assert not report["uniform_int8"]["met"] and len(report["sensitivity"]) == 20 > GUARD_BUILDS
    if gated:
        assert report["sensitivity_gated_trials"] == 20 and not report["sensitivity_proxy_groups"]
        assert max(report["sensitivity"], key=report["sensitivity"].get) == "mm0"
    else:
        assert len(report["sensitivity_proxy_groups"]) == 20 - 3  # three measured scale the rest
    assert "mm0" in report["float_groups"] and manifest["fidelity"]["guard"]["met"]
    assert manifest["delivered"]["precision"] == "int8"


def _detections(count: int) -> np.ndarray:
    """[count, 6] detections as a detector with NMS in its graph outputs them (PaddleDetection's layout): class,
    score (descending), x1, y1, x2, y2 in pixels."""
    corner = RNG.uniform(0, 500, (count, 2))
    return np.concatenate([RNG.integers(0, 10, (count, 1)), np.sort(RNG.uniform(0.5, 1, (count, 1)), 0)[::-1],
                           corner, corner + RNG.uniform(40, 100, (count, 2))], 1).astype(np.float32)


def test_detections_are_matched_one_to_one_whatever_their_number_and_order():
    """After a detector's NMS, int8 moved every box a pixel, swapped two of close score and lost the last: 49 of
    50 boxes kept (F1 98/99 ≥ 0.98), the count [1] agreeing as much — where elementwise figures would see
    another shape, a broken model. A box whose class changed, and one moved off its object (IoU < 0.5), are two
    more boxes lost (94/99)."""
    ref = _detections(50)
    test = ref[:-1] + np.array([0, 0.01, 1, -1, 1, 1], np.float32)
    test[[3, 4]] = test[[4, 3]]
    sets = dict.fromkeys(["dets", "num"])
    meter = FidelityMeter(["dets", "num"], hints=OutputHints(sets=sets))
    meter.update([ref, np.array([50], np.int32)], [test, np.array([49], np.int32)])
    outputs = meter.summary()["outputs"]
    assert outputs["dets"] == {"kind": "detections", "decision_agreement": pytest.approx(98 / 99),
                               "sqnr_db": pytest.approx(-10 * np.log10(max(  # the worst column's, order-free
                                   (49 * shift ** 2 + lost ** 2) / signal for shift, lost, signal in zip(
                                       [0, 0.01, 1, 1, 1, 1], ref[-1].astype(np.float64),
                                       np.square(ref.astype(np.float64)).sum(0)))), rel=1e-4),
                               "items_float": 50, "items_candidate": 49}
    assert outputs["num"]["decision_agreement"] == pytest.approx(98 / 99)
    assert guard.check(meter.summary())["met"]
    test[0, 0] = (test[0, 0] + 1) % 10
    test[1, 2:] += 200
    meter = FidelityMeter(["dets"], hints=OutputHints(sets=sets))
    meter.update([ref], [test])
    assert meter.summary()["outputs"]["dets"]["decision_agreement"] == pytest.approx(94 / 99)
    assert not guard.check(meter.summary())["met"]


def test_padded_detections_and_one_box_labels_are_judged_as_items():
    """TensorFlow's detection layout, padded to 10 rows with zeros ([1, 10, 4] boxes, [1, 10] classes, [1]
    count): the padding is no detection, and [1, 10] is ten items, not one; and a [N] label output is labels
    on a feed with a single detection too (only an output that is one number on every feed is a count)."""
    ref = _detections(4)
    ref[:, 0] = [3, 5, 7, 9]
    test = ref[[1, 0, 2]]  # the fourth box lost
    names = ["detection_boxes", "detection_classes", "num_detections", "labels"]
    meter = FidelityMeter(names, hints=OutputHints(sets=dict.fromkeys(names)))
    for n in range(2):
        boxes = [np.zeros((1, 10, 4), np.float32) for _ in range(2)]
        classes = [np.zeros((1, 10), np.float32) for _ in range(2)]
        for i, d in enumerate((ref, test)):
            boxes[i][0, :len(d)], classes[i][0, :len(d)] = d[:, 2:], d[:, 0] + 1
        labels = (ref[:1, 0], test[:1, 0]) if n else (ref[:, 0], test[:, 0])
        meter.update([boxes[0], classes[0], np.array([len(ref)], np.float32), labels[0].astype(np.int64)],
                     [boxes[1], classes[1], np.array([len(test)], np.float32), labels[1].astype(np.int64)])
    outputs = meter.summary()["outputs"]
    for name in names[:3]:
        assert outputs[name]["decision_agreement"] == pytest.approx(12 / 14), name
    # labels 3, 5, 7, 9 against 5, 3, 7, then a single 3 against a single 5: 3 matched of 5 and 4
    assert outputs["labels"]["items_float"] == 5 and outputs["labels"]["decision_agreement"] == pytest.approx(6 / 9)


def test_integer_items_match_only_where_equal_and_values_within_tolerance():
    """A heat map's peaks ([N, 2] indices, exact) and their values ([N], within 5% of the largest)."""
    peaks = np.array([[1, 2], [3, 4], [5, 6]], np.int64)
    values = np.array([4.1, 2.2, 1.3], np.float32)
    meter = FidelityMeter(["peaks", "values"], hints=OutputHints(sets=dict.fromkeys(["peaks", "values"])))
    meter.update([peaks, values], [np.array([[5, 6], [1, 2], [3, 5]]), np.array([1.4, 4.2, 2.7], np.float32)])
    outputs = meter.summary()["outputs"]
    assert outputs["peaks"]["decision_agreement"] == pytest.approx(2 / 3)  # [3, 5] is not [3, 4]
    assert outputs["values"]["decision_agreement"] == pytest.approx(2 / 3)  # 2.7 is 0.5 from 2.2: over 0.205
    meter = FidelityMeter(["values"], hints=OutputHints(sets={"values": None}))
    meter.update([values], [np.array([4.1, np.nan], np.float32)])
    assert meter.summary()["outputs"]["values"]["decision_agreement"] == 0.0  # a NaN where float has none


def _nms_detector(tmp_path, opset: int = 17):
    """images [1, 3, 32, 32] → Conv → boxes [1, 64, 4] (corner format) and sigmoid scores [1, 2, 64] → NMS →
    dets [N, 6] (class, score, box) and num [1]; beside them a plain feature output whose length is fixed."""
    w_box = RNG.standard_normal((4, 3, 4, 4)).astype(np.float32) * 0.5
    w_score = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    anchors = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(1, 64, 2).astype(np.float32) * 4
    inits = [numpy_helper.from_array(w_box, "w_box"), numpy_helper.from_array(w_score, "w_score"),
             numpy_helper.from_array(anchors, "anchors"),
             numpy_helper.from_array(np.array([20], np.int64), "max_out"),
             numpy_helper.from_array(np.array([0.3], np.float32), "iou"),
             numpy_helper.from_array(np.array([0.6], np.float32), "threshold"),
             numpy_helper.from_array(np.array([1, 4, 64], np.int64), "box_shape"),
             numpy_helper.from_array(np.array([1, 2, 64], np.int64), "score_shape")]
    inits += [numpy_helper.from_array(np.array([i], np.int64), f"i{i}") for i in range(3)]
    nodes = [helper.make_node("Conv", ["images", "w_box"], ["box_map"], strides=[4, 4], name="box_conv"),
             helper.make_node("Reshape", ["box_map", "box_shape"], ["offsets_t"]),
             helper.make_node("Transpose", ["offsets_t"], ["offsets"], perm=[0, 2, 1]),
             helper.make_node("Exp", ["offsets"], ["sizes"]),
             helper.make_node("Concat", ["anchors", "anchors"], ["corners"], axis=2),
             helper.make_node("Mul", ["sizes", "sign"], ["signed"]),
             helper.make_node("Add", ["corners", "signed"], ["boxes"]),
             helper.make_node("Conv", ["images", "w_score"], ["score_map"], strides=[4, 4], name="score_conv"),
             helper.make_node("Reshape", ["score_map", "score_shape"], ["score_logits"]),
             helper.make_node("Sigmoid", ["score_logits"], ["scores"]),
             helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "threshold"], ["selected"]),
             helper.make_node("Gather", ["selected", "i1"], ["class_i"], axis=1),
             helper.make_node("Cast", ["class_i"], ["class_f"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["selected", "i2"], ["index_2d"], axis=1),
             helper.make_node("Squeeze", ["index_2d", "i1"], ["index"]),
             helper.make_node("Squeeze", ["boxes", "i0"], ["boxes_0"]),
             helper.make_node("Gather", ["boxes_0", "index"], ["kept"], axis=0),
             helper.make_node("GatherND", ["scores", "selected"], ["kept_score"]),
             helper.make_node("Unsqueeze", ["kept_score", "i1"], ["kept_score_1"]),
             helper.make_node("Concat", ["class_f", "kept_score_1", "kept"], ["dets"], axis=1),
             helper.make_node("Shape", ["selected"], ["selected_shape"]),
             helper.make_node("Slice", ["selected_shape", "i0", "i1"], ["num"]),
             helper.make_node("GlobalAveragePool", ["box_map"], ["feature"])]
    inits.append(numpy_helper.from_array(np.array([-1, -1, 1, 1], np.float32) * 3, "sign"))
    outputs = [helper.make_tensor_value_info("dets", TensorProto.FLOAT, ["N", 6]),
               helper.make_tensor_value_info("num", TensorProto.INT64, [1]),
               helper.make_tensor_value_info("feature", TensorProto.FLOAT, [1, 4, 1, 1])]
    model = make_model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                       outputs, inits, opset=opset)
    onnx.save(model, tmp_path / "det.onnx")
    return tmp_path / "det.onnx"


def test_outputs_whose_length_depends_on_values_are_found_in_the_graph(tmp_path):
    assert set_outputs(_nms_detector(tmp_path)) == {"dets": None, "num": None}
    branch = helper.make_graph([helper.make_node("NonZero", ["x"], ["where"])], "b", [],
                               [helper.make_tensor_value_info("where", TensorProto.INT64, [1, None])])
    model = make_model([helper.make_node("If", ["c"], ["found"], then_branch=branch, else_branch=branch),
                        helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                       [helper.make_tensor_value_info("found", TensorProto.INT64, [1, None]),
                        helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    onnx.save(model, tmp_path / "if.onnx")
    assert set_outputs(tmp_path / "if.onnx") == {"found": None}


def _top_k_head() -> onnx.ModelProto:
    """An end-to-end detection head without NMS (YOLOv10/YOLO26): class scores [1, 64, 2] → best class's
    score → TopK 20 → boxes gathered by the TopK's indices, concatenated with score and class: [1, 20, 6]."""
    inits = [numpy_helper.from_array(np.array([20], np.int64), "k"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    nodes = [helper.make_node("ReduceMax", ["scores", "axis2"], ["best"], keepdims=0),
             helper.make_node("ArgMax", ["scores"], ["label"], axis=2, keepdims=1),
             helper.make_node("TopK", ["best", "k"], ["top", "index"], axis=1),
             helper.make_node("Unsqueeze", ["index", "axis2"], ["index_3"]),
             helper.make_node("Expand", ["index_3", "box_shape"], ["box_index"]),
             helper.make_node("GatherElements", ["boxes", "box_index"], ["top_boxes"], axis=1),
             helper.make_node("GatherElements", ["label", "index_3"], ["top_label"], axis=1),
             helper.make_node("Cast", ["top_label"], ["top_class"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["top", "axis2"], ["top_score"]),
             helper.make_node("Concat", ["top_boxes", "top_score", "top_class"], ["output0"], axis=2)]
    inits.append(numpy_helper.from_array(np.array([1, 20, 4], np.int64), "box_shape"))
    return make_model(nodes, [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 64, 4]),
                              helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 64, 2])],
                      [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 20, 6])], inits, opset=18)


def test_a_top_k_detection_head_is_judged_by_its_detections_above_the_score_floor():
    """Ranked by score, the top-K's tail (boxes scoring 0.01) is reordered freely by int8 noise: elementwise
    4.4 dB and float delivered for a YOLO end-to-end model. Its rows are a set; the items scoring under the
    floor are no detections, and the detections are all matched."""
    model = _top_k_head()
    assert set_outputs(model) == {"output0": frozenset({20})}
    session = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(4)
    meter = FidelityMeter(["output0"], hints=OutputHints(sets=set_outputs(model)))
    for _ in range(6):
        corners = rng.uniform(0, 200, (1, 64, 2)).astype(np.float32)
        boxes = np.concatenate([corners, corners + rng.uniform(20, 60, (1, 64, 2)).astype(np.float32)], 2)
        scores = rng.uniform(0, 0.02, (1, 64, 2)).astype(np.float32)
        scores[0, rng.choice(64, 3, replace=False), rng.integers(0, 2, 3)] = [0.9, 0.7, 0.5]
        noisy = scores + rng.uniform(-0.005, 0.005, scores.shape).astype(np.float32)
        meter.update(session.run(None, {"boxes": boxes, "scores": scores}),
                     session.run(None, {"boxes": boxes + 0.5, "scores": np.clip(noisy, 0, 1)}))
    detections = meter.summary()["outputs"]["output0"]
    assert detections["kind"] == "detections" and detections["items_float"] == detections["items_candidate"] == 18
    assert detections["decision_agreement"] == 1.0


def test_a_top_k_inside_the_network_leaves_its_outputs_in_a_fixed_order():
    """A point-cloud net's k nearest neighbours (DGCNN; so do graph nets and a mixture of experts' routing):
    TopK 4 over pairwise scores, the neighbours gathered, then reduced over them. Its logits [1, 5] hold no
    axis of 4 items: they are logits (judged as detections, a DGCNN delivered int8 at top-1 0.958)."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(np.array([4], np.int64), "k"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(rng.standard_normal((36, 5)).astype(np.float32), "w")]
    nodes = [helper.make_node("Transpose", ["points"], ["points_t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["points", "points_t"], ["affinity"]),
             helper.make_node("TopK", ["affinity", "k"], ["near", "index"], axis=-1),
             helper.make_node("Squeeze", ["points", "axis0"], ["table"]),
             helper.make_node("Gather", ["table", "index"], ["neighbours"]),  # [1, 12, 4, 3]
             helper.make_node("ReduceMax", ["neighbours"], ["pooled"], axes=[2], keepdims=0),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    model = make_model(nodes, [helper.make_tensor_value_info("points", TensorProto.FLOAT, [1, 12, 3])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], inits)
    assert set_outputs(model) == {"logits": frozenset({4})}
    session = ort.InferenceSession(model.SerializeToString())
    meter = FidelityMeter(["logits"], hints=OutputHints.of(model))
    for _ in range(4):
        points = rng.standard_normal((1, 12, 3)).astype(np.float32)
        meter.update(session.run(None, {"points": points}), session.run(None, {"points": points + 0.01}))
    assert meter.summary()["outputs"]["logits"]["kind"] == "logits"


def test_a_raw_detector_head_is_judged_by_its_decoded_detections():
    """A YOLOv8 head without NMS, [1, 4 + classes, anchors]: box coordinates in pixels dominate the tensor, so
    its elementwise SQNR stays high while a detection is lost (nudenet's head: 30 dB, int8 delivered at
    detection F1 0.94). Its detections are decoded as a deployment does (score ≥ 0.25, per-class NMS) and
    matched; one that falls from 0.27 to 0.23 — a near-tie at the floor — is kept, not lost."""
    rng = np.random.default_rng(2)
    ref = np.zeros((1, 7, 64), np.float32)
    ref[0, :2] = rng.uniform(20, 300, (2, 64))
    ref[0, 2:4] = rng.uniform(10, 60, (2, 64))
    ref[0, 4:] = rng.uniform(0, 0.05, (3, 64))
    for anchor, label, score in ((3, 0, 0.9), (20, 1, 0.6), (40, 2, 0.27)):
        ref[0, :4, anchor + 1] = ref[0, :4, anchor] + 1  # a neighbour anchor on the same object: suppressed
        ref[0, 4 + label, [anchor, anchor + 1]] = score, score - 0.1
    test = ref + np.concatenate([rng.uniform(-0.5, 0.5, (1, 4, 64)), np.zeros((1, 3, 64))], 1).astype(np.float32)
    test[0, 5, [20, 21]] = 0.1  # the 0.6 detection lost
    test[0, 6, 40] = 0.23
    for layout in ((0, 1, 2), (0, 2, 1)):  # YOLOv8's features first, YOLOv5's anchors first
        meter = FidelityMeter(["output0"])
        meter.update([ref.transpose(layout)], [test.transpose(layout)])
        detections = meter.summary()["outputs"]["output0"]
        assert detections["kind"] == "detections" and detections["items_float"] == 3
        assert detections["items_candidate"] == 1 and detections["decision_agreement"] == pytest.approx(3 / 4)
    assert 10 * np.log10(np.square(ref).sum() / np.square(ref - test).sum()) > 30  # elementwise: a map, held
    # a -pose head: keypoints after the scores are read beyond the boxes: held elementwise too
    keypoints = rng.uniform(20, 300, (1, 2, 64)).astype(np.float32)
    pose, moved = (np.concatenate([ref, k], 1) for k in (keypoints, keypoints * rng.uniform(0.5, 1.5, (1, 2, 64))))
    meter = FidelityMeter(["output0"])
    meter.update([pose], [moved.astype(np.float32)])
    result = guard.check(meter.summary())
    assert result["outputs"]["output0"]["kind"] == "detections" and not result["met"]
    assert [c["figure"] for c in result["outputs"]["output0"]["checks"] if not c["met"]] == ["map_sqnr_db"]


def test_a_detector_with_nms_in_its_graph_compiles_judged_by_its_detections(tmp_path):
    """Uniform int8 changes how many boxes survive the NMS on some image: judged elementwise, every such
    candidate had another shape — a broken model — and float was delivered whatever the rest."""
    model = _nms_detector(tmp_path)
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(16):
        np.savez(feeds / f"{i:02d}.npz", images=RNG.standard_normal((1, 3, 32, 32)).astype(np.float32))
    result = CliRunner().invoke(main, ["compile", str(model), "-t", HOST_X86, "--calib", str(feeds),
                                       "--no-measure", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    outputs = manifest["fidelity"]["outputs"]
    assert outputs["dets"]["kind"] == outputs["num"]["kind"] == "detections"
    assert outputs["dets"]["items_float"] == outputs["num"]["items_float"] > 16
    assert outputs["feature"]["kind"] != "detections"
    uniform = manifest["guard"]["uniform_int8"]["outputs"]["dets"]["checks"][0]
    assert uniform["figure"] == "decision_agreement" and uniform["value"] > 0.5
    assert "detections" in result.output


def test_the_op_sets_are_measured_again_with_the_guards_groups_float(tmp_path, monkeypatch):
    """What pays beside an int8 layer changes when its neighbour turns float: after the guard returned a group
    and int8 is still not faster, the op sets fastest before the guard are built again with it float, held to
    the guard, and the choice recorded and replayable."""
    # int8 is never fast enough: the op sets are measured again before float is delivered
    monkeypatch.setattr("edgeq.cli.compile.Recipe",
                        lambda **options: Recipe(**options, max_ratio=0.0, max_ratio_smaller=0.0))
    model, feeds = _outlier_model(tmp_path)
    proto = onnx.load(model)
    proto.graph.node[2].output[0] = "m"
    proto.graph.node.append(helper.make_node("Add", ["m", "r"], ["y"], name="residual"))
    onnx.save(proto, model)
    result = CliRunner().invoke(main, ["compile", str(model), "-t", HOST_X86, "--calib", str(feeds), "-o",
                                       str(tmp_path / "out"), "--repeats", "3"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["guard"]["float_groups"] == ["mm1"]
    op_sets = [t for t in manifest["search"]["trials"] if t["strategy"] == "op set"]
    first = next(t["label"] for t in op_sets if t["chosen"])
    again = [t for t in op_sets if t["label"].endswith("(the guard's float groups)")]
    labels = [t["label"].split(" (")[0] for t in again]
    assert 0 < len(again) <= AFTER_GUARD and first not in labels
    assert set(labels) <= set(manifest["op_sets"]["candidates"]) - {first}
    assert all(t["sqnr_db"] is not None and t["ratio"] is not None for t in again)
    chosen = [label for label, t in zip(labels, again) if t["chosen"]]
    assert manifest["op_sets"]["chosen"] == (chosen[0] if chosen else first)
    # what a lock replays
    assert ("Add" in manifest["recipe"]["optional_ops"]) == manifest["op_sets"]["chosen"].startswith("all")
    assert manifest["fidelity"]["guard"]["met"]
