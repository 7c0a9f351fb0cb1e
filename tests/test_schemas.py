"""manifest.json, --json output and the build lock follow the schemas shipped in the package."""

import json

import jsonschema
import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, HOST_X86
from edgeq import schema
from edgeq.cli import main

CNN = EXAMPLES / "digits_cnn"
VALIDATOR = jsonschema.Draft202012Validator


@pytest.mark.parametrize("name", [schema.MANIFEST, schema.LOCK])
def test_the_schemas_are_valid_json_schemas(name):
    VALIDATOR.check_schema(schema.load(name))


@pytest.mark.parametrize("extra", [
    ("--package", "ort"),
    ("--runtime", "tvm"),
    ("--scheme", "mixed", "--size-mb", "0.5"),
    ("-t", "gpu-ampere", "--sparsity", "2:4"),
])
def test_manifests_and_json_output_follow_the_schema(tmp_path, extra):
    target = () if "-t" in extra else ("-t", HOST_X86)
    result = CliRunner().invoke(main, ["compile", str(CNN / "model.onnx"), *target, "--calib", str(CNN / "calib.npz"),
                                       "--no-measure", "--json", "-o", str(tmp_path / "out"), *extra])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert printed == written
    VALIDATOR(schema.load(schema.MANIFEST)).validate(written)


def test_a_manifest_missing_a_section_fails_the_schema(tmp_path):
    result = CliRunner().invoke(main, ["compile", str(CNN / "model.onnx"), "-t", HOST_X86, "--calib",
                                       str(CNN / "calib.npz"), "--no-measure", "-o", str(tmp_path / "out")])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest["fidelity"]
    with pytest.raises(jsonschema.ValidationError, match="fidelity"):
        VALIDATOR(schema.load(schema.MANIFEST)).validate(manifest)


def test_the_lock_follows_its_schema(tmp_path):
    path = tmp_path / "edgeq.toml"
    path.write_text(f'model = "{CNN / "model.onnx"}"\ntargets = ["{HOST_X86}", "aarch64"]\n'
                    f'[compile]\ncalib = "{CNN / "calib.npz"}"\nno-measure = true\n')
    assert CliRunner().invoke(main, ["build", str(path)]).exit_code == 0
    lock = json.loads(path.with_suffix(".lock").read_text())
    VALIDATOR(schema.load(schema.LOCK)).validate(lock)
    assert set(lock["targets"]) == {HOST_X86, "aarch64"}
