"""The build cache: an unchanged build is restored whole; a bad entry is never served; two builds at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from conftest import EXAMPLES, HOST_X86
from edgeq.cli import main

CNN = EXAMPLES / "digits_cnn"
EDGEQ = str(Path(sys.executable).parent / "edgeq")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build_file(folder, name="edgeq.toml", calib="calib.npz"):
    if not (folder / calib).exists():
        np.savez(folder / calib, image=np.load(CNN / "calib.npz")["image"][:40])
    path = folder / name
    path.write_text(f'model = "{CNN / "model.onnx"}"\ntargets = "{HOST_X86}"\noutput = "out-{path.stem}/{{target}}"\n'
                    f'[compile]\ncalib = "{calib}"\nno-measure = true\n')
    return path


def entries(cache_dir):
    return sorted(p for p in (cache_dir / "artifacts").iterdir() if not p.name.startswith("."))


def test_an_unchanged_build_is_restored_and_a_changed_one_is_not(tmp_path, monkeypatch):
    path = build_file(tmp_path)
    first = run("build", path)
    assert first.exit_code == 0 and "restored from the build cache" not in first.output
    model = tmp_path / "out-edgeq" / HOST_X86 / "model.onnx"
    built = model.read_bytes()
    model.unlink()
    second = run("build", path)
    assert second.exit_code == 0 and "restored from the build cache" in second.output
    assert model.read_bytes() == built
    cache_dir = tmp_path / "cache"  # conftest points EDGEQ_CACHE_DIR into tmp_path
    assert len(entries(cache_dir)) == 1
    listing = run("cache", "ls")
    assert listing.exit_code == 0 and "model.onnx" in listing.output and HOST_X86 in listing.output
    np.savez(tmp_path / "calib.npz", image=np.load(CNN / "calib.npz")["image"][:41])
    third = run("build", path)
    assert third.exit_code == 0 and "restored from the build cache" not in third.output
    assert len(entries(cache_dir)) == 2
    assert run("cache", "clean").exit_code == 0 and entries(cache_dir) == []


def test_a_corrupt_or_half_written_entry_is_discarded_and_rebuilt(tmp_path):
    path = build_file(tmp_path)
    assert run("build", path).exit_code == 0
    cache_dir = tmp_path / "cache"
    (entry,) = entries(cache_dir)
    cached = entry / "model.onnx"
    cached.write_bytes(cached.read_bytes()[:-10])  # a changed file
    again = run("build", path)
    assert again.exit_code == 0 and "restored from the build cache" not in again.output
    (entry,) = entries(cache_dir)
    (entry / "entry.json").unlink()  # what a build killed between copying and renaming would never leave
    (cache_dir / "artifacts" / ".killed.tmp").mkdir()  # what a killed one does leave
    again = run("build", path)
    assert again.exit_code == 0 and "restored from the build cache" not in again.output
    assert json.loads((entries(cache_dir)[0] / "entry.json").read_text())["files"]


def test_two_builds_at_once_share_one_entry(tmp_path):
    paths = [build_file(tmp_path, f"b{i}.toml") for i in range(2)]
    env = os.environ | {"EDGEQ_CACHE_DIR": str(tmp_path / "shared-cache")}
    builds = [subprocess.Popen([EDGEQ, "build", str(p)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in paths]
    outputs = [b.communicate(timeout=300)[0] for b in builds]
    assert [b.returncode for b in builds] == [0, 0], outputs
    models = [(tmp_path / f"out-b{i}" / HOST_X86 / "model.onnx").read_bytes() for i in range(2)]
    assert models[0] == models[1]
    (entry,) = entries(tmp_path / "shared-cache")
    assert not [p for p in (tmp_path / "shared-cache" / "artifacts").iterdir() if p.name.startswith(".")]
    third = subprocess.run([EDGEQ, "build", str(paths[0])], env=env,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "restored from the build cache" in third.stdout
