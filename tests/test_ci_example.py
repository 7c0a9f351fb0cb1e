"""examples/ci: the script its workflow runs, run here for every target of the workflow's matrix."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES

CI = EXAMPLES / "ci"
EDGEQ = str(Path(sys.executable).parent / "edgeq")
MATRIX = re.search(r"target: \[(.*)\]", (CI / "edgeq-build.yml").read_text()).group(1).replace(" ", "").split(",")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The example as a CI runner checks it out: the build file, its committed lock, the model it names."""
    root = tmp_path_factory.mktemp("checkout") / "examples"
    for name in ("ci", "digits_cnn"):
        shutil.copytree(EXAMPLES / name, root / name, ignore=shutil.ignore_patterns("build"))
    shutil.copy(EXAMPLES / "metric.py", root / "metric.py")
    return root


def ci_run(checkout, target, cache):
    env = os.environ | {"EDGEQ": EDGEQ, "EDGEQ_CACHE_DIR": str(cache)}
    return subprocess.run(["bash", str(checkout / "ci" / "build.sh"), target], env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_workflow_runs_the_script_for_each_target_of_the_build_file():
    workflow = (CI / "edgeq-build.yml").read_text()
    assert "bash examples/ci/build.sh ${{ matrix.target }}" in workflow
    targets = re.search(r"^targets = \[(.*)\]", (CI / "edgeq.toml").read_text(), re.M).group(1)
    assert sorted(MATRIX) == sorted(t.strip(' "') for t in targets.split(","))


@pytest.mark.parametrize("target", MATRIX)
def test_the_committed_lock_replays_on_a_fresh_runner_then_from_the_cache(checkout, target, tmp_path):
    first = ci_run(checkout, target, tmp_path / "cache")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "replayed from the lock" in first.stdout and "loads" in first.stdout  # edgeq verify ran
    again = ci_run(checkout, target, tmp_path / "cache")
    assert again.returncode == 0 and "restored from the build cache" in again.stdout


def test_a_stale_lock_fails_the_job_with_exit_2(checkout, tmp_path):
    stale = tmp_path / "examples"
    shutil.copytree(checkout, stale)
    toml = stale / "ci" / "edgeq.toml"
    toml.write_text(toml.read_text().replace('max-drop = "1%"', 'max-drop = "2%"'))
    result = ci_run(stale, MATRIX[0], tmp_path / "cache")
    assert result.returncode == 2 and "option 'max-drop' changed" in result.stderr
    assert "commit edgeq.lock" in result.stderr
