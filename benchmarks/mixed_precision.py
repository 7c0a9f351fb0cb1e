"""Mixed precision vs uniform int8 on the zoo: at equal measured fidelity, at equal measured latency, and
under a drop budget uniform int8 misses; int4 weights for the transformer under a size budget.

    python benchmarks/mixed_precision.py [--models resnet18,mobilenetv2,bert_small] [--calib 64] [--eval 16]

Every mixed compile uses the optional op set (Add, ActMatMul, …) the int8 compile chose, so the variants
differ only in precisions. Fidelity is the output's mean cosine with the float model on the eval feeds,
given to edgeq as a user metric (float scores 1, so the metric drop is 1 − cosine). Per model, with one calibration and sensitivity cache:
- int8: ``--scheme int8`` (op-set choice and the no-slowdown loop): drop D8 and latency L8;
- mixed @ fidelity: ``--scheme mixed --max-drop D8``;
- mixed @ latency: ``--scheme mixed --latency-ms 1.05·L8`` (the most accurate configuration as fast as int8,
  within the few percent compiles measured apart differ by);
- mixed @ ½ drop: ``--max-drop D8/2``, a budget uniform int8 misses by construction;
- (transformers) mixed @ 0.3× size: ``--size-mb`` 0.3 × the float file.
Then every artifact is measured again interleaved with float in one run; the table shows those ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_ort_quantizer import prepare  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.calibration_data import CalibrationData, input_specs  # noqa: E402
from edgeq.model_io import load_model  # noqa: E402
from edgeq.pipeline import CompileRequest, compile_model  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402
from edgeq.runtimes.onnxruntime import OnnxRuntime  # noqa: E402
from edgeq.target import load_target  # noqa: E402

TARGET = "x86-avx512-vnni"
WORK = HERE.parent / "build" / "bench-mixed"
LATENCY_SLACK = 1.05  # latencies measured in different compiles differ by a few percent on a shared machine


METRIC = '''"""Mean cosine of the first output with the float model's (reference.npy beside this file), feed by feed."""
from pathlib import Path

import numpy as np

REFERENCE = np.load(Path(__file__).with_name("reference.npy"))


def cosine(outputs, feeds):
    values = []
    for ref, out in zip(REFERENCE, outputs):
        a, b = ref.ravel().astype(np.float64), next(iter(out.values())).ravel().astype(np.float64)
        values.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return float(np.mean(values))
'''


def write_metric(folder: Path, fp32: Path, evalf: Path, runtime) -> str:
    """A user metric file: cosine with the float outputs on the eval feeds (float scores 1)."""
    session = runtime.session(fp32)
    feeds = list(CalibrationData.from_path(evalf, input_specs(load_model(fp32))))
    np.save(folder / "reference.npy", np.stack([session.run(f.inputs)[0] for f in feeds]))
    (folder / "cosine_metric.py").write_text(METRIC)
    return f"{folder / 'cosine_metric.py'}:cosine"


def compile_variant(model: Path, calib: Path, evalf: Path, metric: str, cache: Path,
                    recipe: Recipe) -> tuple[dict, int, float, Path]:
    out = Path(tempfile.mkdtemp(dir=WORK)) / "out"
    request = CompileRequest(model=model, target=load_target(TARGET), recipe=recipe, out_dir=out, calib=calib,
                             eval=evalf, metric=metric, cache_dir=cache)
    started = time.perf_counter()
    manifest, code = compile_model(request)
    return manifest, code, time.perf_counter() - started, out / "model.onnx"


def bench_model(name: str, calib_count: int, eval_count: int, repeats: int) -> dict:
    folder = WORK / name
    fp32, calib, evalf = prepare(ZOO[name], folder, calib_count, eval_count)
    runtime = OnnxRuntime(load_target(TARGET))
    metric = write_metric(folder, fp32, evalf, runtime)
    feed = next(iter(CalibrationData.from_path(evalf, input_specs(load_model(fp32))))).inputs
    cache = folder / "cache"
    base = Recipe(latency_repeats=repeats)
    rows: dict[str, dict] = {}

    def run(label: str, recipe: Recipe) -> dict:
        manifest, code, seconds, path = compile_variant(fp32, calib, evalf, metric, cache, recipe)
        mixed = manifest.get("mixed", {})
        rows[label] = {"path": path, "optional_ops": manifest["recipe"]["optional_ops"],
                       "drop": manifest["fidelity"]["metric"]["drop"], "exit": code,
                       "seconds": seconds, "bytes": manifest["delivered"]["bytes"],
                       "float_bytes": manifest["delivered"]["float_bytes"],
                       "ms": manifest["latency"]["int8"]["median_ms"] if "int8" in manifest["latency"] else None,
                       "precisions": mixed.get("chosen", {}).get("precisions", manifest["delivered"]["precision"]),
                       "search_s": mixed.get("seconds"), "iterations": len(mixed.get("iterations", []))}
        print(f"  {name} {label}: drop {rows[label]['drop']:.5f} · {rows[label]['ms']} ms · "
              f"{rows[label]['precisions']} · exit {code} · {seconds:.0f} s", flush=True)
        return rows[label]

    int8 = run("int8", base)
    d8, l8 = int8["drop"], int8["ms"]
    base = replace(base, optional_ops=int8["optional_ops"])  # one op set for all: the op-set choice is timed too
    run("mixed @ fidelity", replace(base, scheme="mixed", max_drop=max(d8, 1e-6)))
    run("mixed @ latency", replace(base, scheme="mixed", latency_ms=l8 * LATENCY_SLACK))
    run("mixed @ ½ drop", replace(base, scheme="mixed", max_drop=max(d8 / 2, 1e-7)))
    if name in ("bert_small", "vit_tiny"):
        run("mixed @ 0.3× size", replace(base, scheme="mixed", size_mb=0.3 * int8["float_bytes"] / 1e6))
    latency = runtime.measure({"float": fp32} | {k: v["path"] for k, v in rows.items()}, feed,
                              warmup=5, repeats=repeats)
    for label, row in rows.items():
        row["ratio_vs_float"] = latency[label].median_ms / latency["float"].median_ms
        row["ratio_vs_int8"] = latency[label].median_ms / latency["int8"].median_ms
        row["loss_vs_int8"] = row["drop"] / d8 if d8 > 0 else float("nan")
        row["path"] = str(row["path"])
    return {"model": name, "rows": rows}


def print_table(results: list[dict]) -> None:
    print("\n| model | variant | 1 − cos | loss / int8's | latency / float | latency / int8 | size / float | "
          "precisions | exit | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for label, row in r["rows"].items():
            print(f"| {r['model']} | {label} | {row['drop']:.2e} | {row['loss_vs_int8']:.2f} | "
                  f"{row['ratio_vs_float']:.2f} | {row['ratio_vs_int8']:.2f} | "
                  f"{row['bytes'] / row['float_bytes']:.2f} | "
                  f"{row['precisions']} | {row['exit']} | {row['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,mobilenetv2,efficientnet,bert_small")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = [bench_model(m, args.calib, args.eval, args.repeats) for m in args.models.split(",")]
    (WORK / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(results)


if __name__ == "__main__":
    main()
