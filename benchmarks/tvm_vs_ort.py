"""Tuned TVM fp32 vs ONNX Runtime fp32 on the zoo, on this machine, measured side by side in one process.

    python benchmarks/tvm_vs_ort.py [--models resnet18,mobilenetv2,bert_small] [--trials 512] [--steps 4]

For every model, from an empty tuning database: build untuned; tune in ``--steps`` equal steps up to
``--trials`` cumulative trials (each step continues from the database), building after each step; then
recompile once more from the full database (a database hit: no tuning). Each build is measured interleaved
with ONNX Runtime fp32 (the target's thread count, 1) on the same feed; the target is the x86 one this CPU
runs (``--target``). Columns: tuning wall time, TVM/ORT median latency ratio untuned and tuned, the
database-hit recompile time, and the largest relative output error of the tuned build vs ORT on 8 evaluation
feeds (max |tvm - ort| / max |ort|). The curve table lists the ratio after each step. Only ratios are
meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_ort_quantizer import prepare  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.calibration_data import CalibrationData, input_specs  # noqa: E402
from edgeq.model_io import load_model  # noqa: E402
from edgeq.runtimes import tvm_tuning  # noqa: E402
from edgeq.runtimes.base import measure_interleaved  # noqa: E402
from edgeq.runtimes.onnxruntime import OnnxRuntime  # noqa: E402
from edgeq.runtimes.tvm import TvmRuntime  # noqa: E402
from edgeq.target import host_x86_target, load_target  # noqa: E402
from edgeq.model_check import max_relative_error  # noqa: E402



def bench_model(name: str, work: Path, trials: int, steps: int, repeats: int, target_name: str) -> dict:
    target = load_target(target_name)
    fp32, _, eval_folder = prepare(ZOO[name], Path("build/bench") / name, 8, 8)
    feeds = [f.inputs for f in CalibrationData.from_path(eval_folder, input_specs(load_model(fp32)))]
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db_folder = folder / "database"
    database = tvm_tuning.open_database(db_folder)
    ort_session = OnnxRuntime(target).session(fp32)

    def against_ort(library: Path) -> tuple[float, float, float]:
        """TVM/ORT median ratio, ORT ms, TVM ms, measured interleaved."""
        session = TvmRuntime(target, feed=feeds[0]).session(library)
        latency = measure_interleaved({"ort": lambda: ort_session.run(feeds[0]), "tvm": session.runner(feeds[0])},
                                      warmup=3, repeats=repeats)
        return latency["tvm"].median_ms / latency["ort"].median_ms, latency["ort"].median_ms, latency["tvm"].median_ms

    untuned_dir = folder / "untuned"
    untuned_dir.mkdir()
    runtime = TvmRuntime(target, database=database, feed=feeds[0])
    fused = runtime.lower(fp32)
    untuned = TvmRuntime(target, feed=feeds[0]).build(fp32, untuned_dir)
    untuned_ratio, ort_ms, untuned_ms = against_ort(untuned)
    curve, tuning_seconds, report = [], 0.0, None
    for step in range(1, steps + 1):
        report = tvm_tuning.tune(fused, target, trials * step // steps, database, db_folder)
        tuning_seconds += report.seconds
        step_dir = folder / f"step{step}"
        step_dir.mkdir()
        library = runtime.build(fp32, step_dir)
        r, _, tvm_ms = against_ort(library)
        curve.append({"trials": report.trials_in_database_before + report.trials_run, "tuning_s": tuning_seconds,
                      "ratio": r, "tvm_ms": tvm_ms})
        print(f"  {name}: {curve[-1]}", file=sys.stderr)
    started = time.perf_counter()  # a fresh compile that finds every trial in the database
    hit_runtime = TvmRuntime(target, database=tvm_tuning.open_database(db_folder), feed=feeds[0])
    hit_fused = hit_runtime.lower(fp32)
    hit = tvm_tuning.tune(hit_fused, target, trials, hit_runtime.database, db_folder)
    recompile_dir = folder / "recompiled"
    recompile_dir.mkdir()
    tuned = hit_runtime.build(fp32, recompile_dir)
    recompile_s = time.perf_counter() - started
    tuned_session = TvmRuntime(target, feed=feeds[0]).session(tuned)
    error = max(max_relative_error(ort_session.run(f), tuned_session.run(f)) for f in feeds)
    tuned_ratio, _, tuned_ms = against_ort(tuned)
    return {"model": name, "tasks": report.tasks, "trials": curve[-1]["trials"], "tuning_s": tuning_seconds,
            "ort_ms": ort_ms, "untuned_ms": untuned_ms, "untuned_ratio": untuned_ratio, "tuned_ms": tuned_ms,
            "tuned_ratio": tuned_ratio, "recompile_s": recompile_s, "recompile_hit": hit.hit,
            "max_rel_error": error, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenetv2,bert_small")
    parser.add_argument("--trials", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("build/bench-tvm"))
    parser.add_argument("--target", default=None, help="default: x86-avx512-vnni where this CPU has it, else x86-64")
    args = parser.parse_args()
    target = args.target or host_x86_target("tvm")
    rows = []
    for model in args.models.split(","):
        rows.append(bench_model(model, args.work, args.trials, args.steps, args.repeats, target))
        print(f"  {model}: {rows[-1]}", file=sys.stderr)
        (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nTVM vs ONNX Runtime fp32 on {target} (1 thread each), cumulative trial budget {args.trials}\n")
    print("| model | tasks | trials | tuning (min) | ORT ms | TVM untuned ×ORT | TVM tuned ×ORT "
          "| DB-hit recompile (s) | max rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tasks']} | {r['trials']} | {r['tuning_s'] / 60:.1f} | {r['ort_ms']:.2f} | "
              f"{r['untuned_ratio']:.1f} | {r['tuned_ratio']:.2f} | {r['recompile_s']:.1f} | "
              f"{r['max_rel_error']:.1e} |")
    print("\nTrials vs latency (TVM/ORT median ratio after each step)\n")
    print("| model | " + " | ".join(f"step {i + 1}" for i in range(args.steps)) + " |")
    print("|---|" + "---|" * args.steps)
    for r in rows:
        steps = (f"{c['trials']} trials, {c['tuning_s'] / 60:.1f} min: ×{c['ratio']:.2f}" for c in r["curve"])
        print(f"| {r['model']} | " + " | ".join(steps) + " |")


if __name__ == "__main__":
    main()
