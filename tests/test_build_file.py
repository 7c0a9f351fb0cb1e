"""The build file: ``edgeq init`` writes it from compile's options, ``edgeq build`` runs it (a target matrix)."""

import json
import tomllib

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES
from edgeq import build_file
from edgeq.cli import main
from edgeq.cli.compile import compile as compile_command

CNN = EXAMPLES / "digits_cnn"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_init_writes_what_differs_from_the_defaults_with_paths_relative_to_the_file(tmp_path):
    path = tmp_path / "project" / "edgeq.toml"
    result = run("init", CNN / "model.onnx", "-t", "x86-64", "--calib", CNN / "calib.npz", "--max-drop", "1%",
                 "--exclude", "op:Gemm", "--exclude", "name:conv1", "--no-measure", "--method", "percentile",
                 "-f", path)
    assert result.exit_code == 0, result.output
    data = tomllib.loads(path.read_text())
    assert data["edgeq"] == "build/1" and data["targets"] == ["x86-64"] and data["output"] == "build/{target}"
    assert (path.parent / data["model"]).resolve() == (CNN / "model.onnx").resolve()
    assert data["compile"] == {"calib": data["compile"]["calib"], "max-drop": "1%",  # --method's default: not written
                               "exclude": ["op:Gemm", "name:conv1"], "no-measure": True}
    assert (path.parent / data["compile"]["calib"]).resolve() == (CNN / "calib.npz").resolve()
    one_line_error(run("init", CNN / "model.onnx", "-t", "x86-64", "-f", path), "exists")


def test_the_file_reads_back_as_the_same_options_the_command_line_gives(tmp_path):
    """One schema: a file written from flags loads to exactly what click parses from those flags."""
    flags = ["--calib", str(CNN / "calib.npz"), "--eval", str(CNN / "eval.npz"), "--scheme", "mixed",
             "--latency-ms", "2.5", "--repeats", "7", "--exclude", "re:^fc", "--sensitivity", "proxy",
             "--no-guard", "--ptq", "gptq,bias-correction", "--metric", f"{EXAMPLES / 'metric.py'}:accuracy"]
    path = tmp_path / "edgeq.toml"
    assert run("init", CNN / "model.onnx", "-t", "x86-64", *flags, "-f", path).exit_code == 0
    loaded = build_file.load(path, compile_command)
    parsed = compile_command.make_context("compile", [str(CNN / "model.onnx"), "-t", "x", "-o", "o", *flags]).params
    given = {name: value for name, value in parsed.items() if name in loaded.options}
    assert set(given) == set(loaded.options) == {"calib", "eval_path", "scheme", "latency_ms", "repeats", "exclude",
                                                 "sensitivity", "no_guard", "ptq", "metric"}
    for name, value in given.items():
        mine = loaded.options[name]
        if name in ("calib", "eval_path"):
            assert mine.resolve() == value.resolve()
        elif name == "metric":
            assert mine.rpartition(":")[2] == "accuracy" and mine.rpartition(":")[0].endswith("metric.py")
        else:
            assert mine == value, name


def test_build_runs_every_target_of_the_matrix(tmp_path):
    path = tmp_path / "edgeq.toml"
    assert run("init", CNN / "model.onnx", "-t", "x86-64", "-t", "aarch64", "--calib", CNN / "calib.npz",
               "--no-measure", "-f", path).exit_code == 0
    result = run("build", path, "--json")
    assert result.exit_code == 0, result.output
    manifests = json.loads(result.output)
    assert sorted(manifests) == ["aarch64", "x86-64"]
    for target, manifest in manifests.items():
        assert manifest["target"]["name"] == target
        assert (tmp_path / "build" / target / "model.onnx").is_file()
    only = run("build", path, "-t", "aarch64", "--json")
    assert only.exit_code == 0 and list(json.loads(only.output)) == ["aarch64"]
    one_line_error(run("build", path, "-t", "x86-avx512-vnni"), "target 'x86-avx512-vnni' is not in")


@pytest.mark.parametrize("text, message", [
    ('edgeq = "build/1"\nmodel = "m.onnx"\ntargets = "x86-64"\n[compile]\nmax_dorp = "1%"\n', "unknown key 'max_dorp'"),
    ('model = "m.onnx"\ntargets = "x86-64"\nmodels = []\n', "unknown key 'models'"),
    ('model = "m.onnx"\ntargets = "x86-64"\n[compile]\nrepeats = "many"\n', "[compile] repeats"),
    ('model = "m.onnx"\ntargets = "x86-64"\n[compile]\nno-measure = "yes"\n', "is a switch"),
    ('model = "m.onnx"\ntargets = "x86-64"\n[compile]\nexclude = "op:Gemm"\n', "takes a list"),
    ('model = "m.onnx"\ntargets = ["x86-64", "aarch64"]\noutput = "out"\n', "the same folder for every target"),
    ('targets = "x86-64"\n', "names no model"),
    ('edgeq = "build/9"\nmodel = "m.onnx"\ntargets = "x86-64"\n', "format 'build/9'"),
    ('model = "m.onnx"\ntargets = \n', "not readable TOML"),
])
def test_a_bad_build_file_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "edgeq.toml"
    path.write_text(text)
    one_line_error(run("build", path), message)
    assert not (tmp_path / "build").exists()


def test_a_missing_build_file_says_how_to_write_one(tmp_path):
    one_line_error(run("build", tmp_path / "edgeq.toml"), "edgeq init")
    one_line_error(run("init", tmp_path / "absent.onnx", "-t", "x86-64", "-f", tmp_path / "edgeq.toml"), "not found")
    assert not (tmp_path / "edgeq.toml").exists()
