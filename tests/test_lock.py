"""edgeq.lock: a build records every measured decision; ``edgeq build --locked`` replays it byte for byte."""

import hashlib
import json

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, HOST_X86, make_model
from test_guard import _corrupt_calibration_model, _outlier_model
from edgeq import schema
from edgeq.cli import main

CNN = EXAMPLES / "digits_cnn"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_build(folder, model, target, **options):
    lines = [f'model = "{model}"', f'targets = "{target}"', 'output = "out/{target}"', "[compile]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    (folder / "edgeq.toml").write_text("\n".join(lines) + "\n")
    return folder / "edgeq.toml"


def build_and_replay(path, target):
    """A measured build, then a locked one; returns (manifest, replayed manifest, lock entry)."""
    first = run("build", path, "--json")
    assert first.exit_code == 0, first.output
    artifact = path.parent / "out" / target
    timed = {"manifest.json", "report.html"}  # they hold timings: not compared
    before = {p.name: p.read_bytes() for p in artifact.iterdir() if p.name not in timed}
    again = run("build", path, "--locked", "--json")
    assert again.exit_code == 0, again.output
    after = {p.name: p.read_bytes() for p in artifact.iterdir() if p.name not in timed}
    assert before == after and (artifact / "report.html").is_file()
    entry = json.loads(path.with_suffix(".lock").read_text())["targets"][target]
    assert set(entry["artifact"]) == set(before)
    measured, replayed = json.loads(first.output)[target], json.loads(again.output)[target]
    if "calibration" in replayed:  # an ONNX Runtime build: the lock's ranges, no calibration run
        assert replayed["calibration"]["from_lock"] and not measured["calibration"]["from_lock"]
        assert replayed["calibration"]["ranges"] == measured["calibration"]["ranges"]
    return measured, replayed, entry


def test_the_guards_decisions_replay_without_measuring(tmp_path):
    model, feeds = _outlier_model(tmp_path)
    path = write_build(tmp_path, model, HOST_X86, calib=str(feeds), **{"no-measure": True})
    measured, replayed, entry = build_and_replay(path, HOST_X86)
    assert "mm1" in entry["decisions"]["keep_float"] and entry["decisions"]["delivered"] == "int8"
    assert any(t["strategy"] == "guard" for t in measured["search"]["trials"])
    assert not any(t["strategy"] == "guard" for t in replayed["search"]["trials"])  # nothing searched again
    assert replayed["quantization"]["decisions"]["mm1"]["quantized"] is False


def test_per_tensor_calibration_methods_replay(tmp_path):
    _corrupt_calibration_model(tmp_path)  # the entropy range ignores its corrupt calibration values
    path = write_build(tmp_path, "m.onnx", HOST_X86, calib="calib.npz", eval="eval.npz", **{"no-measure": True})
    _, replayed, entry = build_and_replay(path, HOST_X86)
    assert entry["decisions"]["ranges"]["x"] == "entropy" and replayed["calibration"]["per_tensor"]["x"] == "entropy"


def test_a_float_delivery_replays(tmp_path):
    """One MatMul whose int8 input range an outlier feature ruins: no int8 build holds the guard."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    w[0] *= 0.002
    onnx.save(make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])],
                         [numpy_helper.from_array(w, "w")]), tmp_path / "m.onnx")
    x = rng.standard_normal((30, 8, 64)).astype(np.float32)
    x[..., 0] = 500.0 * np.sign(rng.standard_normal((30, 8)))
    np.savez(tmp_path / "calib.npz", x=x)
    path = write_build(tmp_path, "m.onnx", HOST_X86, calib="calib.npz", **{"no-measure": True})
    measured, replayed, entry = build_and_replay(path, HOST_X86)
    assert measured["delivered"]["precision"] == "float" == entry["decisions"]["delivered"]
    assert replayed["delivered"]["precision"] == "float" and "replayed" in replayed["delivered"]["reason"]


def test_mixed_precision_replays_its_per_node_precisions(tmp_path):
    folder = EXAMPLES / "digits_transformer"
    path = write_build(tmp_path, folder / "model.onnx", HOST_X86, calib=str(folder / "calib.npz"),
                       eval=str(folder / "eval.npz"), scheme="mixed", **{"max-drop": "1%", "no-measure": True})
    _, replayed, entry = build_and_replay(path, HOST_X86)
    assert entry["decisions"]["precisions"] and replayed["delivered"]["precision"] in ("mixed", "float")
    assert "mixed" not in replayed  # no search ran


def test_a_2_4_build_replays_the_layers_it_left_dense(tmp_path):
    path = write_build(tmp_path, CNN / "model.onnx", "gpu-ampere", calib=str(CNN / "calib.npz"),
                       sparsity="2:4", **{"no-measure": True})
    _, replayed, entry = build_and_replay(path, "gpu-ampere")
    assert entry["decisions"]["keep_dense"] is not None and replayed["sparsity"]["pruned"]
    assert entry["decisions"]["weights"]  # the reconstructed weights are recorded (rule 4)


def _ptq_build(tmp_path):
    path = write_build(tmp_path, CNN / "model.onnx", HOST_X86, calib=str(CNN / "calib.npz"),
                       ptq="gptq,bias-correction", **{"no-measure": True})
    measured, replayed, entry = build_and_replay(path, HOST_X86)
    return path, measured, replayed, entry


def test_ptq_weights_are_recorded_beside_the_lock_and_replayed(tmp_path):
    """GPTQ and bias correction compute with this CPU's BLAS: the lock records the weights they made, content-
    addressed, and a replay takes those (changed ones give other bytes: proof the replay used them)."""
    path, measured, replayed, entry = _ptq_build(tmp_path)
    assert measured["delivered"]["precision"] == "int8" and measured["ptq"]["techniques"]
    assert "gptq" in measured["ptq"] and "gptq" not in replayed["ptq"]  # the replay solved nothing: it took them
    assert replayed["ptq"]["weights_from_lock"] and not measured["ptq"].get("weights_from_lock")
    weights, folder = entry["decisions"]["weights"], tmp_path / "edgeq.weights"
    assert weights and {f"{d}.npy" for d in weights.values()} == {p.name for p in folder.iterdir()}
    lock = json.loads(path.with_suffix(".lock").read_text())
    jsonschema.Draft202012Validator(schema.load(schema.LOCK)).validate(lock)
    name = next(n for n in weights if np.load(folder / f"{weights[n]}.npy").dtype == np.float32)
    array = np.load(folder / f"{weights[name]}.npy") * 1.5  # another CPU's rounding, exaggerated
    np.save(folder / "changed.npy", array)
    digest = hashlib.sha256((folder / "changed.npy").read_bytes()).hexdigest()
    (folder / "changed.npy").rename(folder / f"{digest}.npy")
    lock["targets"][HOST_X86]["decisions"]["weights"][name] = digest
    path.with_suffix(".lock").write_text(json.dumps(lock))
    result = run("build", path, "--locked")
    assert result.exit_code == 1 and "did not reproduce model.onnx" in result.output


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_a_missing_or_altered_weight_file_is_one_line_and_publishes_nothing(tmp_path, damage):
    path, _, _, entry = _ptq_build(tmp_path)
    victim = tmp_path / "edgeq.weights" / f"{next(iter(entry['decisions']['weights'].values()))}.npy"
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\0")
    model = tmp_path / "out" / HOST_X86 / "model.onnx"
    before = model.read_bytes()
    model.unlink()
    one_line_error(run("build", path, "--locked"), "is missing" if damage == "missing" else "does not match")
    assert not model.exists() and before


def test_a_tvm_build_replays(tmp_path):
    path = write_build(tmp_path, CNN / "model.onnx", HOST_X86, runtime="tvm", eval=str(CNN / "eval.npz"),
                       **{"no-measure": True})
    _, _, entry = build_and_replay(path, HOST_X86)
    assert "model.so" in entry["artifact"] and entry["decisions"]["tuning_records"] is None


@pytest.fixture
def locked(tmp_path):
    np.savez(tmp_path / "calib.npz", image=np.load(CNN / "calib.npz")["image"][:40])
    path = write_build(tmp_path, CNN / "model.onnx", HOST_X86, calib="calib.npz", **{"no-measure": True})
    assert run("build", path).exit_code == 0
    return path


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_changed_input_is_named_and_relock_accepts_it(locked):
    lock_before = locked.with_suffix(".lock").read_text()
    np.savez(locked.parent / "calib.npz", image=np.load(CNN / "calib.npz")["image"][:41])
    one_line_error(run("build", locked, "--locked"), "input 'calib' changed")
    assert locked.with_suffix(".lock").read_text() == lock_before
    assert run("build", locked, "--locked", "--relock").exit_code == 0
    assert locked.with_suffix(".lock").read_text() != lock_before
    assert run("build", locked, "--locked").exit_code == 0


@pytest.mark.parametrize("edit, message", [
    (lambda lock: lock | {"edgeq": "lock/2"}, "format 'lock/2'"),
    (lambda lock: lock | {"tools": lock["tools"] | {"edgeq": "9.0.0"}}, "another major version"),
    (lambda lock: lock | {"tools": lock["tools"] | {"onnx": "1.0.0"}}, "onnx is"),
])
def test_a_lock_from_other_tools_is_refused(locked, edit, message):
    path = locked.with_suffix(".lock")
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    one_line_error(run("build", locked, "--locked"), message)
    assert run("build", locked, "--locked", "--relock").exit_code == 0  # accepted: rebuilt and locked anew
    assert run("build", locked, "--locked").exit_code == 0


def test_a_replay_that_differs_publishes_nothing(locked):
    path = locked.with_suffix(".lock")
    lock = json.loads(path.read_text())
    lock["targets"][HOST_X86]["artifact"]["model.onnx"] = "0" * 64
    path.write_text(json.dumps(lock))
    model = locked.parent / "out" / HOST_X86 / "model.onnx"
    before = model.read_bytes()
    result = run("build", locked, "--locked")
    assert result.exit_code == 1 and "did not reproduce model.onnx" in result.output
    assert model.read_bytes() == before


def test_the_replay_quantizes_with_the_recorded_activation_ranges(locked):
    """The ranges come from the lock, not from calibrating again (another CPU's kernels round differently)."""
    path = locked.with_suffix(".lock")
    lock = json.loads(path.read_text())
    ranges = lock["targets"][HOST_X86]["decisions"]["activation_ranges"]
    assert ranges and all(len(r) == 2 and r[0] <= r[1] for r in ranges.values())
    assert lock["targets"][HOST_X86]["decisions"]["delivered"] == "int8"  # --no-measure: nothing sends it float
    for name in ranges:
        ranges[name] = [2 * ranges[name][0], 2 * ranges[name][1]]
    path.write_text(json.dumps(lock))
    result = run("build", locked, "--locked")  # wider ranges: other scales, other bytes, refused
    assert result.exit_code == 1 and "did not reproduce model.onnx" in result.output
