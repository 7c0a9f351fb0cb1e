"""Devices, measured side by side in one run: this machine as an ssh board against this machine itself, and a
compile measured on an emulated aarch64 board.

    python benchmarks/devices.py [--models resnet18,mobilenetv2] [--rounds 3] [--repeats 50] [--work DIR]
                                 [--board BOARD_DIR/python] [--board-optional-ops auto] [--recheck 64]

Needs root and OpenSSH (server and client): it starts a real sshd on 127.0.0.1 with generated keys
(``tests/sshd.py``) and hands its client options to edgeq through ``$EDGEQ_SSH_OPTIONS``.

1. Localhost as a device. For each zoo model: export it, build edgeq's int8 model for this machine's x86 target
   (:func:`edgeq.target.host_x86_target`; ``compile_model`` without measurement), then measure the int8/float
   latency ratio with ``OnnxRuntime(target, device).measure`` through ``LocalDevice`` (the agent in this
   process) and through ``SshDevice("ssh://root@127.0.0.1:PORT/<this python>")`` (the same agent sent over ssh
   to a fresh interpreter), alternately, ``--rounds`` times each: local, ssh, then ssh, local, … (each pair in
   the other order, so a drift of the machine hits both alike). Each measurement is the agent's latency protocol
   (interleaved float/int8 on one feed) with its noise rule; its flags (busy, throttled) and retries are
   printed. Columns: the ratio per round, the median ratio, the round-to-round spread ((max − min) / median), the
   flags; then the relative difference of the two devices' median ratios, which should be within the spread
   (the issue's target: on localhost-as-a-device the ssh device's ratios agree with local within noise).
2. The aarch64 board (``--board``: an arm64 Python with numpy and onnxruntime, e.g. the qemu-user board of
   ``benchmarks/aarch64_board.sh``; skipped when absent). ``edgeq device check ssh://…board… -t aarch64``,
   printed as it is; then ``edgeq compile examples/digits_cnn/model.onnx -t aarch64 --calib … --eval …
   --device ssh://…board… --json``, timed: exit code, wall time, where the manifest says latency was measured,
   the delivered precision, the fidelity figures, and whether fidelity ran on the board: by the rule
   (:func:`edgeq.devices.base.int8_differs_from_here`, an aarch64 board computes int8 unlike x86), by the feed
   bundles the board received during the compile, and (``--recheck N``) by the delivered model's fidelity on
   the first N evaluation feeds computed both here (x86) and on the board.
   TIMINGS UNDER EMULATION ARE MEANINGLESS: qemu-user runs Arm code on x86 by translation, so the board's
   latencies and ratios (and the delivered precision where the no-slowdown check decided it) say nothing about
   a real Arm CPU. This part checks that builds run and agree on aarch64, and that the protocol holds up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
import sshd  # noqa: E402
from vs_ort_quantizer import prepare  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.devices.base import int8_differs_from_here  # noqa: E402
from edgeq.devices.local import LocalDevice  # noqa: E402
from edgeq.devices.ssh import SshDevice  # noqa: E402
from edgeq.pipeline import CompileRequest, compile_model  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402
from edgeq.runtimes.onnxruntime import OnnxRuntime  # noqa: E402
from edgeq.target import host_x86_target, load_target  # noqa: E402

EDGEQ = str(Path(sys.executable).parent / "edgeq")
DIGITS = REPO / "examples" / "digits_cnn"


# ---------------------------------------------------------------- 1. localhost as a device


def build_int8(name: str, work: Path, target: str, calib_count: int) -> tuple[Path, Path, dict, float]:
    """(float model, edgeq's int8 model, one feed, compile seconds) of a zoo model."""
    entry = ZOO[name]
    fp32, calib, evalf = prepare(entry, work / name, calib_count, 1)
    out = work / name / "edgeq"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest, _ = compile_model(CompileRequest(model=fp32, target=load_target(target), recipe=Recipe(), out_dir=out,
                                               calib=calib, measure=False, cache_dir=None))
    seconds = time.perf_counter() - started
    if manifest["delivered"]["precision"] != "int8":
        raise SystemExit(f"{name}: edgeq delivered {manifest['delivered']['precision']}, not int8")
    feed = dict(np.load(sorted(evalf.glob("*.npz"))[0]))
    return fp32, out / "model.onnx", feed, seconds


def _flags(latency) -> str:
    c = latency.conditions
    parts = list(c["flags"])
    if c["tries"] > 1:
        parts.append(f"{c['tries']} tries")
    return ",".join(parts)


def agreement(name: str, fp32: Path, int8: Path, feed: dict, target: str, address: str, rounds: int, warmup: int,
              repeats: int) -> dict:
    rules = load_target(target)
    remote = SshDevice(address)
    try:
        runtimes = {"local": OnnxRuntime(rules, LocalDevice()), "ssh": OnnxRuntime(rules, remote)}
        rows = {dev: {"ratios": [], "float_ms": [], "int8_ms": [], "flags": [], "foreign": []} for dev in runtimes}
        started = time.perf_counter()
        for r in range(rounds):
            for dev in (("local", "ssh") if r % 2 == 0 else ("ssh", "local")):
                lat = runtimes[dev].measure({"float": fp32, "int8": int8}, feed, warmup, repeats)
                row = rows[dev]
                row["ratios"].append(lat["int8"].median_ms / lat["float"].median_ms)
                row["float_ms"].append(lat["float"].median_ms)
                row["int8_ms"].append(lat["int8"].median_ms)
                row["flags"].append(_flags(lat["int8"]))
                row["foreign"].append(lat["int8"].conditions["foreign_load_cores"])
                print(f"  {name} round {r + 1} {dev:<5} ratio {row['ratios'][-1]:.3f} (float "
                      f"{lat['float'].median_ms:.2f} ms, int8 {lat['int8'].median_ms:.2f} ms, "
                      f"{lat['int8'].runs} runs each, foreign load {row['foreign'][-1]} cores"
                      f"{', ' + row['flags'][-1] if row['flags'][-1] else ''})", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - started
    finally:
        remote.close()
    for row in rows.values():
        ratios = np.asarray(row["ratios"])
        row["median"] = float(np.median(ratios))
        row["spread"] = float((ratios.max() - ratios.min()) / row["median"])
    diff = abs(rows["ssh"]["median"] - rows["local"]["median"]) / rows["local"]["median"]
    return {"model": name, "rows": rows, "relative_difference": diff, "seconds": seconds,
            "within_noise": diff <= max(rows["local"]["spread"], rows["ssh"]["spread"])}


def print_agreement(results: list[dict], rounds: int, address: str) -> None:
    print(f"\n1. localhost as a device: int8/float latency ratio, local (in this process) vs {address}")
    rounds_header = "".join(f"{f'r{i + 1}':>7}" for i in range(rounds))
    header = (f"{'model':<13}{'device':<7}{rounds_header}{'median':>8}{'spread':>8}{'float ms':>10}{'int8 ms':>9}"
              f"  flags per round")
    print(header)
    print("-" * len(header))
    for res in results:
        for dev, row in res["rows"].items():
            per_round = "".join(f"{v:>7.3f}" for v in row["ratios"])
            flags = " ".join(f"r{i + 1}:{f}" for i, f in enumerate(row["flags"]) if f) or "none"
            print(f"{res['model']:<13}{dev:<7}{per_round}{row['median']:>8.3f}{row['spread']:>7.1%} "
                  f"{np.median(row['float_ms']):>10.2f}{np.median(row['int8_ms']):>9.2f}  {flags}")
    print()
    for res in results:
        noise = max(res["rows"]["local"]["spread"], res["rows"]["ssh"]["spread"])
        print(f"{res['model']:<13}median ratio ssh vs local: relative difference {res['relative_difference']:.1%} "
              f"(round-to-round spread up to {noise:.1%}) → {'agree' if res['within_noise'] else 'DISAGREE'} "
              f"within noise  [{res['seconds']:.0f} s of measuring]")


# ---------------------------------------------------------------- 2. the aarch64 board


def _bundles(folder: Path) -> dict[str, list[str]]:
    return {p.name: sorted(f.name for f in p.iterdir()) for p in folder.iterdir() if p.is_dir()} \
        if folder.is_dir() else {}


def _fidelity_line(summary: dict) -> str:
    parts = []
    for name, o in summary["outputs"].items():
        if "cosine" not in o:
            parts.append(f"{name}: {o['kind']} agreement {o['decision_agreement']:.4f}")
            continue
        top1 = f", top-1 agree {o['top1_agreement']:.4f}" if "top1_agreement" in o else ""
        parts.append(f"{name}: cosine {o['cosine']:.6f}, SQNR {o['sqnr_db']:.2f} dB{top1}")
    return "; ".join(parts)


def recheck(float_model: Path, int8_model: Path, address: str, count: int, manifest: dict) -> None:
    """The delivered model's fidelity on the first ``count`` evaluation feeds, here (x86) and on the board."""
    from edgeq.calibration_data import CalibrationData, input_specs
    from edgeq.fidelity import compare_models
    from edgeq.model_io import load_model

    feeds = CalibrationData.from_path(DIGITS / "eval.npz", input_specs(load_model(float_model)))
    rules = load_target("aarch64")
    board = SshDevice(address)
    try:
        started = time.perf_counter()
        here = compare_models(OnnxRuntime(rules, LocalDevice()), float_model, int8_model, feeds, limit=count)
        here_s = time.perf_counter() - started
        started = time.perf_counter()
        there = compare_models(OnnxRuntime(rules, board), float_model, int8_model, feeds, limit=count)
        there_s = time.perf_counter() - started
        first = next(iter(feeds)).inputs
        x86 = LocalDevice().session(int8_model, OnnxRuntime(rules).settings).run(first)[0]
        arm = board.session(int8_model, OnnxRuntime(rules).settings).run(first)[0]
    finally:
        board.close()
    count = min(count, len(feeds))
    print(f"  recheck on the first {count} of {len(feeds)} eval feeds, delivered model vs the float model:")
    print(f"    manifest (all feeds):  {_fidelity_line(manifest['fidelity'])}")
    print(f"    here (x86, {here_s:.1f} s):      {_fidelity_line(here)}")
    print(f"    board (aarch64, {there_s:.1f} s): {_fidelity_line(there)}")
    print(f"    int8 output of feed 0, board vs here: max abs difference {float(np.abs(arm - x86).max()):.3g} "
          f"({'identical' if np.array_equal(arm, x86) else 'the two CPUs compute int8 differently'})")


def board_part(board: str, port: int, device_dir: Path, work: Path, optional_ops: str, calib_limit: int,
               timeout: int, recheck_count: int) -> None:
    address = f"ssh://root@127.0.0.1:{port}{board}"
    print(f"\n2. aarch64 board {address}")
    print("   (qemu-user emulation: every timing below, latency ratio included, is MEANINGLESS for a real Arm CPU)")
    env = dict(os.environ)
    started = time.perf_counter()
    check = subprocess.run([EDGEQ, "device", "check", address, "-t", "aarch64"], env=env, capture_output=True,
                           text=True, timeout=timeout)
    print(f"\n$ edgeq device check {address} -t aarch64   (exit {check.returncode}, "
          f"{time.perf_counter() - started:.1f} s)")
    print((check.stdout + check.stderr).rstrip())
    probe = SshDevice(address)
    try:
        facts = probe.facts()
    finally:
        probe.close()
    to_board = int8_differs_from_here(facts)
    print(f"rule: int8_differs_from_here(board facts) = {to_board} → fidelity runs "
          f"{'on the board' if to_board else 'here'}")

    calib = DIGITS / "calib.npz"
    if calib_limit:
        data = dict(np.load(calib))
        calib = work / "digits_calib.npz"
        np.savez(calib, **{k: v[:calib_limit] for k, v in data.items()})
    out = work / "digits_aarch64"
    shutil.rmtree(out, ignore_errors=True)
    command = [EDGEQ, "compile", str(DIGITS / "model.onnx"), "-t", "aarch64", "--calib", str(calib), "--eval",
               str(DIGITS / "eval.npz"), "--device", address, "--optional-ops", optional_ops, "--no-cache", "-o",
               str(out), "--json"]
    before = _bundles(device_dir)
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
        stdout, stderr = (s.decode(errors="replace") if isinstance(s, bytes) else s for s in (stdout, stderr))
    wall = time.perf_counter() - started
    new = {b: files for b, files in _bundles(device_dir).items() if b not in before}
    feeds_pushed = sum(1 for files in new.values() if files == ["feed.npz"])
    models_pushed = sum(1 for files in new.values() if any(f.endswith(".onnx") for f in files))
    print(f"exit code {code}, wall time {wall:.1f} s (emulated: meaningless)")
    if code not in (0, 3):
        print("stderr (last lines):\n  " + "\n  ".join(stderr.strip().splitlines()[-15:]))
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        print("no manifest written")
        return
    manifest = json.loads(manifest_path.read_text())
    lat, delivered, q = manifest["latency"], manifest["delivered"], manifest["quantization"]
    print(f"latency.device:     {json.dumps(lat.get('device'))}")
    if "ratio" in lat:
        conditions = lat["int8"]["conditions"]
        print(f"latency (emulated, meaningless): float {lat['float']['median_ms']:.3f} ms, int8 "
              f"{lat['int8']['median_ms']:.3f} ms, ratio {lat['ratio']:.2f}; flags "
              f"{conditions['flags'] or 'none'}, conditions.device {conditions['device']}")
    else:
        print(f"latency: not measured: {lat.get('why')}")
    reason = f" ({delivered['reason']})" if delivered["reason"] else ""
    print(f"delivered:          {delivered['precision']}{reason}")
    print(f"quantized nodes:    {q['quantized_nodes']} (float {q['float_nodes']})")
    print(f"fidelity:           {_fidelity_line(manifest['fidelity'])}")
    search = [f"{t['label']} ×{t['ratio']:.2f}" for t in manifest["search"]["trials"] if t.get("strategy") == "op set"]
    if search:
        print(f"op-set trials (emulated ratios, meaningless): {', '.join(search)}")
    print(f"pushed to the board during the compile: {models_pushed} model bundles, {feeds_pushed} feed bundles "
          f"(measure and profile use one feed; more means eval feeds ran there)")
    print(f"fidelity ran on the board: {'yes' if to_board and feeds_pushed > 1 else 'NO'} (rule says "
          f"{'board' if to_board else 'here'}, {feeds_pushed} feeds went there)")
    if recheck_count and (out / "model.onnx").exists():
        recheck(DIGITS / "model.onnx", out / "model.onnx", address, recheck_count, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenetv2")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per device, alternating")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--calib", type=int, default=32, help="calibration samples per zoo model")
    parser.add_argument("--work", type=Path, default=Path("build/bench-devices"))
    parser.add_argument("--board", help="an aarch64 Python for the board part (e.g. BOARD_DIR/python)")
    parser.add_argument("--board-optional-ops", default="auto", help="--optional-ops of the board compile")
    parser.add_argument("--board-calib", type=int, default=0, help="use the first N calibration samples (0: all)")
    parser.add_argument("--board-timeout", type=int, default=1800, help="seconds for each board command")
    parser.add_argument("--recheck", type=int, default=64, help="eval feeds of the fidelity recheck (0: none)")
    parser.add_argument("--skip-local", action="store_true", help="only the board part")
    args = parser.parse_args()
    why = sshd.available()
    if why:
        raise SystemExit(f"cannot start sshd: {why}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    target = host_x86_target()
    for fresh in ("sshd", "device files"):  # new keys, and a board that has no files yet
        shutil.rmtree(work / fresh, ignore_errors=True)
    started = time.perf_counter()
    with sshd.sshd(work / "sshd", work / "device files") as (port, options):
        os.environ["EDGEQ_SSH_OPTIONS"] = options
        if not args.skip_local:
            address = f"ssh://root@127.0.0.1:{port}{sys.executable}"
            results = []
            for name in args.models.split(","):
                fp32, int8, feed, compile_s = build_int8(name, work, target, args.calib)
                print(f"… {name}: int8 built for {target} in {compile_s:.0f} s", file=sys.stderr, flush=True)
                results.append(agreement(name, fp32, int8, feed, target, address, args.rounds, args.warmup,
                                         args.repeats))
            print_agreement(results, args.rounds, address)
            (work / "agreement.json").write_text(json.dumps(results, indent=2))
        if args.board and Path(args.board).exists():
            board_part(args.board, port, work / "device files", work, args.board_optional_ops, args.board_calib,
                       args.board_timeout, args.recheck)
        elif args.board:
            print(f"\n2. aarch64 board: skipped ({args.board} does not exist)")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
