"""Devices: the noise protocol, the check rule, and a real ssh board (sshd on 127.0.0.1 with generated keys)."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import sshd
from conftest import HOST_X86, conv_model, write_feeds
from edgeq.devices import agent
from edgeq.devices.agent import npz_arrays, npz_bytes
from edgeq.devices.ssh import SshAddress, SshDevice
from edgeq.errors import UserError
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import host_x86_target, load_target
from test_cli import run


def _conditions(throttle_counts, loads):
    """Scripted readings: each conditions() call takes the next throttle count; each window the next load."""
    counts, windows = iter(throttle_counts), iter(loads)

    class Meter:
        def foreign_cores(self):
            return next(windows)

    return (lambda: {"governor": "performance", "temperature_c": 50.0, "throttle_count": next(counts),
                     "load_1m": 0.1}), Meter


def test_a_throttled_measurement_is_flagged_and_repeated_once_the_throttling_stopped(monkeypatch):
    # try 1: the count rises 3 → 4 (throttled); the probe sees 4 (passed); try 2: 4 → 4 (clean)
    conditions, meter = _conditions([3, 4, 4, 4, 4], [0.0, 0.0, 0.0])
    monkeypatch.setattr(agent, "conditions", conditions)
    monkeypatch.setattr(agent, "LoadMeter", meter)
    monkeypatch.setattr(agent, "PROBE_S", 0.0)
    latency, record = agent.measured({"a": lambda: None}, warmup=1, repeats=3, noise={"retries": 2})
    assert record["tries"] == 2 and not record["flagged"] and record["flags"] == []
    assert record["before"]["throttle_count"] == 4 and record["protocol"]["retries"] == 2
    assert latency["a"]["runs"] >= 3


def test_a_foreign_load_that_persists_is_recorded_not_measured_into_again(monkeypatch):
    conditions, meter = _conditions([0] * 10, [1.6, 1.6])  # the run's window, then the probe's: still busy
    monkeypatch.setattr(agent, "conditions", conditions)
    monkeypatch.setattr(agent, "LoadMeter", meter)
    monkeypatch.setattr(agent, "PROBE_S", 0.0)
    _, record = agent.measured({"a": lambda: None}, warmup=1, repeats=3, noise={"retries": 3})
    assert record["tries"] == 1 and record["flagged"] and record["flags"] == ["busy"]
    assert record["foreign_load_cores"] == 1.6


def test_foreign_load_counts_only_the_cpus_the_measurement_may_run_on(monkeypatch):
    # cpu0 busy 40 of 100 ticks (user 30, system 10), cpu1 busy 100 of 100: a board pinned to cpu0 sees cpu0 only
    stat = ("cpu  130 0 10 60 0 0 0 0 0 0\ncpu0 30 0 10 60 0 0 0 0 0 0\ncpu1 100 0 0 0 0 0 0 0 0 0\n"
            "intr 1 2 3\nctxt 4\n")
    monkeypatch.setattr(agent, "_read", lambda path: stat)
    assert agent._busy_jiffies({0}) == (40, 100)
    assert agent._busy_jiffies({0, 1}) == (140, 200)
    assert agent._busy_jiffies({7}) is None


def test_local_measurements_carry_their_conditions(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), path)
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    latency = OnnxRuntime(load_target(HOST_X86)).measure({"a": path, "b": path}, feed, warmup=1, repeats=3)
    record = latency["a"].to_dict()["conditions"]
    assert record["device"] == "local" and record["tries"] >= 1 and {"before", "after", "flags"} <= set(record)
    assert set(record["before"]) == {"governor", "temperature_c", "throttle_count", "load_1m"}


def test_device_facts_name_tvm_without_importing_it():
    """Every compile reads the device's facts: importing TVM for its version would cost seconds each time."""
    code = ("import sys; from edgeq.devices.agent import facts; version = facts()['tvm']; "
            "print(version, 'tvm' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    from importlib.metadata import version

    assert shown == [version("apache-tvm"), "False"]


def test_feeds_serialize_to_the_same_bytes_every_time():
    feed = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.array([1, 2], np.int64)}
    first = npz_bytes(feed)
    assert npz_bytes(feed) == first  # no time stamp: one bundle per feed
    back = npz_arrays(first)
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in feed.items())


@pytest.mark.parametrize("address", ["ssh://", "ssh://-oProxyCommand=x", "ssh://user@", "ftp://host"])
def test_bad_device_addresses_are_one_line(address, tmp_path):
    result = run("device", "check", address)
    assert result.exit_code == 2 and "bad device address" in result.output and "Traceback" not in result.output


def test_ssh_addresses_parse_with_their_python_and_quote_it():
    where = SshAddress.parse("ssh://pi@pi5.local:2222/home/pi/my venv;1/bin/python")
    assert (where.user, where.host, where.port, where.python) == ("pi", "pi5.local", 2222, "/home/pi/my venv;1/bin/python")
    assert SshAddress.parse("ssh://board").python == "python3"
    command = where.ssh_command("true")
    assert command[-3:] == ["--", "pi@pi5.local", "true"] and ["-p", "2222"] == command[command.index("-p"):][:2]


# ---------------------------------------------------------------- a real ssh board on localhost


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    why = sshd.available()
    if why:
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("board")
    python = folder / "board dir; x" / "python"  # the board's interpreter path has a space and a ';'
    python.parent.mkdir()
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    with sshd.sshd(folder / "sshd", folder / "device files") as (port, options):
        yield SimpleNamespace(address=f"ssh://root@127.0.0.1:{port}{python}", options=options,
                              files=folder / "device files", port=port)


@pytest.fixture
def ssh_options(board, monkeypatch):
    monkeypatch.setenv("EDGEQ_SSH_OPTIONS", board.options)
    return board


def test_tvm_builds_are_refused_on_an_ssh_board_not_run_here_under_its_name(ssh_options, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), model)
    result = run("profile", model, "-t", host_x86_target("tvm"), "--runtime", "tvm", "--device", ssh_options.address,
                 "-o", tmp_path / "profile")
    assert result.exit_code == 2 and "rpc://" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "profile").exists()


def test_device_check_over_ssh_reports_the_board_and_refuses_a_mismatch(ssh_options):
    result = run("device", "check", ssh_options.address, "-t", HOST_X86, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["facts"]["arch"] == "x86_64" and report["facts"]["onnxruntime"]
    assert "CPUExecutionProvider" in report["facts"]["providers"] and report["facts"]["cores"] >= 1
    wrong = run("device", "check", ssh_options.address, "-t", "aarch64")
    assert wrong.exit_code == 2
    assert wrong.output.strip().splitlines()[-1].startswith(f"error: device {ssh_options.address} cannot measure "
                                                            "target aarch64: the device is x86_64")


def test_compile_measured_on_an_ssh_board_records_where_and_pushes_each_file_once(ssh_options, tmp_path):
    model = tmp_path / "my model; v1.onnx"
    onnx.save(conv_model(), model)
    feeds = write_feeds(tmp_path / "feeds", "x", (1, 3, 16, 16), 16)
    out = tmp_path / "out dir"
    result = run("compile", model, "-t", HOST_X86, "--calib", feeds, "--device", ssh_options.address,
                 "--optional-ops", "none", "--allow-slowdown", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    latency = manifest["latency"]
    assert latency["device"]["address"] == ssh_options.address and latency["device"]["arch"] == "x86_64"
    for side in ("float", "int8"):
        conditions = latency[side]["conditions"]
        assert conditions["device"] == ssh_options.address and conditions["protocol"]["interleaved"]
        assert {"before", "after", "foreign_load_cores", "flags", "tries"} <= set(conditions)
    bundles = sorted(p.name for p in ssh_options.files.iterdir())
    assert bundles and all((ssh_options.files / b).is_dir() for b in bundles)
    assert any((ssh_options.files / b / "model.onnx").exists() for b in bundles)
    again = run("compile", model, "-t", HOST_X86, "--calib", feeds, "--device", ssh_options.address,
                "--optional-ops", "none", "--allow-slowdown", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in ssh_options.files.iterdir()) == bundles  # the same bytes: nothing pushed anew
    # (--allow-slowdown: which builds are made does not hang on measured latency)


def test_a_board_runs_a_model_as_this_machine_does(ssh_options, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(seed=3), path)
    target = load_target(HOST_X86)
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    device = SshDevice(ssh_options.address)
    try:
        remote = OnnxRuntime(target, device)
        kernels = remote.profile(path, feed, runs=3)
        outputs = device.session(path, remote.settings).run(feed)
    finally:
        device.close()
    local = OnnxRuntime(target)
    assert {t.name for t in kernels} == {t.name for t in local.profile(path, feed, runs=3)} >= {"conv2", "fc"}
    np.testing.assert_allclose(outputs[0], local.session(path).run(feed)[0], rtol=1e-6)


def test_an_unreachable_board_is_one_line_and_writes_nothing(board, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_SSH_OPTIONS", board.options)
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), model)
    feeds = write_feeds(tmp_path / "feeds", "x", (1, 3, 16, 16), 8)
    missing_python = f"ssh://root@127.0.0.1:{board.port}/no/such/python"
    result = run("compile", model, "-t", HOST_X86, "--calib", feeds, "--device", missing_python, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "closed the connection" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="Connection refused|closed the connection"):
        SshDevice(f"ssh://root@127.0.0.1:{sshd._free_port()}").facts()


# ---------------------------------------------------------------- two boards behind a TVM RPC tracker


def test_a_compile_spreads_its_op_set_candidates_over_two_boards_under_one_key(tmp_path):
    """A tracker and two 'edgeq device serve' boards on 127.0.0.1: the compile's op sets are measured on both,
    the delivered model is profiled on one of them (ONNX Runtime and TVM), and TVM tunes on both at once."""
    pytest.importorskip("tvm")
    import rpc_farm

    edgeq = [sys.executable, "-c", "from edgeq.cli import main; main()", "device", "serve", "--host", "127.0.0.1"]
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), model)
    feeds = write_feeds(tmp_path / "feeds", "x", (1, 3, 16, 16), 16)
    with rpc_farm.farm(edgeq, boards=2, key="farm", env={"EDGEQ_DEVICE_DIR": str(tmp_path / "boards")}) as address:
        result = run("compile", model, "-t", HOST_X86, "--calib", feeds, "--device", address, "--allow-slowdown",
                     "-o", tmp_path / "out")
        profiled = run("profile", model, "-t", HOST_X86, "--device", address, "--compare",
                       tmp_path / "out" / "model.onnx", "--runs", 3, "-o", tmp_path / "profile")
        tvm_profiled = run("profile", model, "-t", host_x86_target("tvm"), "--runtime", "tvm", "--device", address,
                           "--runs", 3, "-o", tmp_path / "tvm-profile")
        tuned = run("compile", model, "-t", host_x86_target("tvm"), "--runtime", "tvm", "--tune-trials", 8,
                    "--device", address, "--repeats", 5, "-o", tmp_path / "tvm-out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    op_sets = [t for t in manifest["search"]["trials"] if t["strategy"] == "op set"]
    assert len(op_sets) >= 2 and len({t["board"] for t in op_sets}) == 2  # measured on both boards
    assert manifest["latency"]["device"]["address"] == address and manifest["search"]["measure_seconds"] > 0
    assert profiled.exit_code == 0, profiled.output
    profile = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert profile["device"]["address"] == address
    assert all(m["latency"]["conditions"]["device"] == address for m in profile["models"].values())
    assert {"conv1", "conv2", "fc"} <= {n["name"] for n in profile["models"]["model.onnx"]["nodes"]}
    assert tvm_profiled.exit_code == 0, tvm_profiled.output  # TVM's kernels timed on the board itself
    tvm_profile = json.loads((tmp_path / "tvm-profile" / "profile.json").read_text())
    assert tvm_profile["device"]["address"] == address and tvm_profile["names"] == "tvm-kernels"
    assert any(n["name"].startswith("fused_conv2d") and n["ms"] > 0 for n in tvm_profile["models"]["m.onnx"]["nodes"])
    assert tuned.exit_code == 0, tuned.output  # TVM's candidates timed on both boards at once
    tuning = json.loads((tmp_path / "tvm-out" / "manifest.json").read_text())["tvm"]["tuning"]
    assert tuning["boards"] == 2 and tuning["trials_run"] >= 8


def test_two_boards_sharing_a_folder_may_push_the_same_bundle_at_once(tmp_path, monkeypatch):
    # the other board's rename lands between this one's write and its rename: this one's copy is discarded
    digest, content = "ab" * 32, b"model bytes"
    handler, real_rename = agent.Handler(str(tmp_path)), agent.os.rename

    def rename_after_the_other_board(source, destination):
        (tmp_path / digest).mkdir()
        (tmp_path / digest / "m.onnx").write_bytes(content)
        real_rename(source, destination)

    monkeypatch.setattr(agent.os, "rename", rename_after_the_other_board)
    answer, _ = handler.handle({"op": "put", "bundle": digest, "files": [["m.onnx", len(content)]]},
                               io.BytesIO(content).read)
    assert answer == {} and (tmp_path / digest / "m.onnx").read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [digest]  # no partial copy left behind


def test_a_partial_upload_left_by_a_killed_transfer_is_pruned_once_stale(tmp_path):
    stale, fresh, bundle = (tmp_path / f"{'ab' * 32}.partial-1"), (tmp_path / f"{'cd' * 32}.partial-2"), tmp_path / "ef"
    for folder in (stale, fresh, bundle):
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"x" * 10)
    old = time.time() - agent.STALE_PARTIAL_S - 60
    os.utime(stale, (old, old))
    assert agent.prune(str(tmp_path), 1 << 20) == 0  # under the size limit: no bundle goes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, bundle.name])
