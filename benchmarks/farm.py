"""A device farm, measured side by side in one run: the same compile measured on one board and on two boards under
one TVM RPC tracker key.

    python benchmarks/farm.py [--models resnet18,mobilenetv2] [--rounds 2] [--calib 32] [--work DIR]

For each zoo model: export it with seeded calibration and evaluation feeds, then compile it for this machine's
x86 target (:func:`edgeq.target.host_x86_target`) with ``--device rpc://127.0.0.1:PORT/farm`` against a farm
of one board, then of two (``tests/rpc_farm.py``: a tracker and ``edgeq device serve`` boards on 127.0.0.1),
alternately, ``--rounds`` times each: 1, 2, then 2, 1, … (so a drift of the machine hits both alike). Board i is
pinned to CPU i with taskset, so each board is a one-core board of its own, as the x86 targets measure with one
thread; the agent counts foreign load on its own CPUs only, so two boards on one host do not flag each other
busy. The compiles are the same (same model, feeds and recipe; the cache is off), so they build the same
candidates.

Columns: the candidates the compile measured (latency pairs; the op sets are one batch, measured in parallel on
every free board), how many distinct boards measured them, the manifest's ``search.measure_seconds`` (the wall
time of all latency measurement) and the whole compile's wall time, each as the median over the rounds; then the
ratio two boards / one board. The issue's target: a compile's measurement wall time on two boards ≤ 0.65× one
board's. Only the op-set batch runs in parallel: the no-slowdown rounds and the guard's measurements depend on
each other's figures and run one after another on the compile's own board, so the ratio is bounded by the share
of the measurement the batch is (with k op-set candidates and one no-slowdown pair: (⌈k/2⌉ + 1) / (k + 1)).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
import rpc_farm  # noqa: E402
from vs_ort_quantizer import prepare  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.pipeline import CompileRequest, compile_model  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402
from edgeq.target import host_x86_target, load_target  # noqa: E402

BOARD = [sys.executable, "-c", "from edgeq.cli import main; main()", "device", "serve", "--host", "127.0.0.1"]


def compile_on_farm(fp32: Path, calib: Path, evalf: Path, out: Path, boards: int, board_dir: Path) -> dict:
    """One compile measured on a fresh farm of ``boards`` boards: its measured figures."""
    cpus = sorted(os.sched_getaffinity(0))
    with rpc_farm.farm(BOARD, boards=boards, key="farm", env={"EDGEQ_DEVICE_DIR": str(board_dir)},
                       cpus=[cpus[i % len(cpus)] for i in range(boards)]) as address:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        manifest, _ = compile_model(CompileRequest(
            model=fp32, target=load_target(host_x86_target()).with_device(address), recipe=Recipe(), out_dir=out,
            calib=calib, eval=evalf, cache_dir=None))
        seconds = time.perf_counter() - started
    timed = [t for t in manifest["search"]["trials"] if "ratio" in t]
    return {"seconds": seconds, "measure_seconds": manifest["search"]["measure_seconds"], "pairs": len(timed),
            "op_sets": sum(t["strategy"] == "op set" for t in timed), "boards": len({t.get("board") for t in timed}),
            "flagged": sum(bool(t.get("flags")) for t in timed), "delivered": manifest["delivered"]["precision"],
            "labels": [f"{t['strategy']}: {t['label']}" for t in timed]}


def bench(name: str, work: Path, rounds: int, calib_count: int) -> dict:
    fp32, calib, evalf = prepare(ZOO[name], work / name, calib_count, 8)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(rounds):
        for boards in ((1, 2) if r % 2 == 0 else (2, 1)):
            run = compile_on_farm(fp32, calib, evalf, work / name / f"out{boards}", boards, work / f"boards{boards}")
            runs[boards].append(run)
            print(f"  {name} round {r + 1}, {boards} board(s): {run['pairs']} latency pairs ({run['op_sets']} op "
                  f"sets) on {run['boards']} board(s), measuring {run['measure_seconds']:.1f} s of "
                  f"{run['seconds']:.1f} s, {run['flagged']} flagged, delivered {run['delivered']}",
                  file=sys.stderr, flush=True)
    if runs[1][0]["labels"] != runs[2][0]["labels"]:
        print(f"  {name}: the two farms' compiles measured different candidates:\n    {runs[1][0]['labels']}\n"
              f"    {runs[2][0]['labels']}", file=sys.stderr)
    row = {"model": name, "same_candidates": runs[1][0]["labels"] == runs[2][0]["labels"]}
    for boards, rs in runs.items():
        row[boards] = {key: float(np.median([r[key] for r in rs])) for key in ("measure_seconds", "seconds")} | {
            key: rs[0][key] for key in ("pairs", "op_sets", "boards", "delivered")} | {
            "flagged": sum(r["flagged"] for r in rs)}
    row["measure_ratio"] = row[2]["measure_seconds"] / row[1]["measure_seconds"]
    row["compile_ratio"] = row[2]["seconds"] / row[1]["seconds"]
    k = row[1]["op_sets"]
    row["bound"] = ((k + 1) // 2 + row[1]["pairs"] - k) / row[1]["pairs"]
    return row


def print_table(rows: list[dict], rounds: int) -> None:
    print(f"\nTwo boards vs one under one tracker key (median of {rounds} rounds each; board i pinned to CPU i)")
    header = (f"{'model':<13}{'pairs':>6}{'op sets':>8}{'boards 1/2':>11}{'measure s 1':>12}{'measure s 2':>12}"
              f"{'ratio':>7}{'bound':>7}{'compile s 1':>12}{'compile s 2':>12}{'ratio':>7}{'flagged':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        one, two = row[1], row[2]
        boards = f"{one['boards']}/{two['boards']}"
        print(f"{row['model']:<13}{one['pairs']:>6}{one['op_sets']:>8}{boards:>11}"
              f"{one['measure_seconds']:>12.1f}{two['measure_seconds']:>12.1f}{row['measure_ratio']:>7.2f}"
              f"{row['bound']:>7.2f}{one['seconds']:>12.1f}{two['seconds']:>12.1f}{row['compile_ratio']:>7.2f}"
              f"{one['flagged'] + two['flagged']:>8}")
    print("\nratio: two boards / one board (target: measurement ≤ 0.65); bound: the ratio if the op-set batch halved "
          "and the rest stayed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenetv2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: each board is pinned to a CPU of its own")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeq-farm-"))
    rows = [bench(name, work, args.rounds, args.calib) for name in args.models.split(",")]
    print_table(rows, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
