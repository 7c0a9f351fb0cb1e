"""What each post-training technique and the fidelity guard buy, per model: accuracy and latency side by side.

    python benchmarks/accuracy_ablation.py [--models resnet18,digits_cnn] [--repeats 30]
    python benchmarks/accuracy_ablation.py --corpus DIR [--data DATA] [--models a,b]   # the real-model corpus

Variants, each a full ``edgeq compile`` on this CPU's x86 target:
- ``uniform``: static int8 everywhere quantizable (every optional op), no technique, no guard, no no-slowdown
  check (``--ptq none --no-guard --allow-slowdown --optional-ops all``): what plain calibration gives;
- ``cle``, ``smooth``, ``gptq``, ``bias``: that plus one technique (cross-layer equalization; SmoothQuant;
  reconstructed weight rounding; bias correction);
- ``all``: the four techniques;
- ``dynamic``: the MatMul/Gemm layers in dynamic int8 (run-time activation scales) and no optional op
  (``--optional-ops DynamicMatMul``): ONNX Runtime's dynamic quantization, for transformers;
- ``default``: ``edgeq compile`` with no flags (the default techniques, the fidelity guard, no-slowdown).
Zoo models (benchmarks/zoo.py, random weights with BatchNorm statistics set on data) and the two digits
examples (trained; their accuracy is the metric) are compiled in this process, and every variant's model runs
interleaved with fp32 in one process, 1 thread, for the latency ratio. Columns: worst-output SQNR (dB) and
top-1 agreement with fp32 on held-out feeds (the digits examples: accuracy), int8/fp32 latency, the fidelity
guard's verdict on that build, and what was delivered. With ``--corpus``, the variants run through the corpus's
own ``evaluate.py`` (task metric, tolerance, latency) and its table is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from realworld import prepare as prepare_corpus  # noqa: E402
from realworld import run_setting, table  # noqa: E402
from vs_ort_quantizer import prepare, session  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq import guard  # noqa: E402
from edgeq.fidelity import worst_sqnr  # noqa: E402
from edgeq.pipeline import CompileRequest, compile_model  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402
from edgeq.runtimes.base import measure_interleaved  # noqa: E402
from edgeq.target import host_x86_target, load_target  # noqa: E402

EXAMPLES = HERE.parent / "examples"
_PLAIN = {"guard": False, "no_slowdown": False, "optional_ops": "all"}
_PLAIN_FLAGS = "--no-guard --allow-slowdown --optional-ops all"
VARIANTS = {  # name → (recipe fields, the same as compile flags)
    "uniform": ({"ptq": ()} | _PLAIN, f"--ptq none {_PLAIN_FLAGS}"),
    "cle": ({"ptq": ("cle",)} | _PLAIN, f"--ptq cle {_PLAIN_FLAGS}"),
    "smooth": ({"ptq": ("smoothquant",)} | _PLAIN, f"--ptq smoothquant {_PLAIN_FLAGS}"),
    "gptq": ({"ptq": ("gptq",)} | _PLAIN, f"--ptq gptq {_PLAIN_FLAGS}"),
    "bias": ({"ptq": ("bias-correction",)} | _PLAIN, f"--ptq bias-correction {_PLAIN_FLAGS}"),
    "all": ({"ptq": ("cle", "smoothquant", "gptq", "bias-correction")} | _PLAIN,
            f"--ptq cle,smoothquant,gptq,bias-correction {_PLAIN_FLAGS}"),
    "dynamic": ({"ptq": (), "guard": False, "no_slowdown": False, "optional_ops": "DynamicMatMul"},
                "--ptq none --no-guard --allow-slowdown --optional-ops DynamicMatMul"),
    "default": ({}, ""),
}


def _inputs(name: str, work: Path, calib_count: int) -> tuple[Path, Path, Path, str | None]:
    """(fp32 model, calibration feeds, evaluation feeds, metric) of a zoo model or a digits example."""
    if name in ZOO:
        fp32, calib, evalf = prepare(ZOO[name], work / name, calib_count, 16)
        return fp32, calib, evalf, None
    folder = EXAMPLES / name
    return folder / "model.onnx", folder / "calib.npz", folder / "eval.npz", f"{EXAMPLES / 'metric.py'}:accuracy"


def _eval_feeds(evalf: Path) -> list[dict]:
    if evalf.is_dir():
        return [dict(np.load(p)) for p in sorted(evalf.glob("*.npz"))]
    stacked = dict(np.load(evalf))
    names = [k for k in stacked if k != "label"]
    count = len(stacked[names[0]])
    return [{k: stacked[k][i:i + 1] for k in names} for i in range(min(count, 64))]


def bench_model(name: str, work: Path, calib_count: int, repeats: int, variants: list[str]) -> list[dict]:
    fp32, calib, evalf, metric = _inputs(name, work, calib_count)
    target = load_target(host_x86_target())
    rows, paths = [], {"fp32": fp32}
    for variant in variants:
        fields = VARIANTS[variant][0]
        out = work / name / f"ablation-{variant}"
        started = time.perf_counter()
        manifest, _ = compile_model(CompileRequest(model=fp32, target=target, recipe=Recipe(latency_repeats=20, **fields),
                                                   out_dir=out, calib=calib, eval=evalf, metric=metric,
                                                   cache_dir=work / "cache"))
        fidelity = manifest["fidelity"]
        outputs = fidelity["outputs"].values()
        top1 = [o["top1_agreement"] for o in outputs if "top1_agreement" in o]
        rows.append({"model": name, "variant": variant, "seconds": time.perf_counter() - started,
                     "sqnr": worst_sqnr(fidelity), "top1": min(top1) if top1 else None,
                     "metric": fidelity.get("metric", {}).get("candidate"),
                     "guard": guard.check(fidelity)["met"], "delivered": manifest["delivered"]["precision"],
                     "float_groups": len(manifest["guard"].get("float_groups", []))})
        paths[variant] = out / "model.onnx"
    sessions = {k: session(p) for k, p in paths.items()}
    feed = _eval_feeds(evalf)[0]
    latency = measure_interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, warmup=3,
                                  repeats=repeats)
    for row in rows:
        row["ratio"] = latency[row["variant"]].median_ms / latency["fp32"].median_ms
    return rows


def print_table(rows: list[dict], header: bool = True) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    if header:
        print(f"{'model':<19}{'variant':<9}{'SQNR dB':>9}{'top-1':>8}{'metric':>8}{'int8/fp32':>10}{'guard':>7}"
              f"{'compile s':>10}  delivered")
    for r in rows:
        delivered = r["delivered"] + (f" ({r['float_groups']} groups float)" if r["float_groups"] else "")
        print(f"{r['model']:<19}{r['variant']:<9}{f(r['sqnr'], '.1f'):>9}{f(r['top1'], '.3f'):>8}"
              f"{f(r['metric'], '.4f'):>8}{r['ratio']:>10.2f}{'met' if r['guard'] else 'missed':>7}"
              f"{r['seconds']:>10.1f}  {delivered}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated subset (zoo names, digits_cnn, digits_transformer, or "
                                         "corpus names with --corpus)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calib", type=int, default=32, help="calibration feeds per zoo model")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("build/accuracy_ablation"))
    parser.add_argument("--corpus", type=Path, help="the real-model corpus's folder (see benchmarks/realworld.py)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "REALWORLD_DIR", Path.home() / ".cache" / "edgeq-realworld")))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per corpus compile")
    parser.add_argument("--reuse", action="store_true", help="corpus: reuse earlier runs' JSON where present")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.corpus:
        corpus, data = args.corpus.resolve(), args.data.expanduser().resolve()
        python = prepare_corpus(corpus, data)
        runs = {v: run_setting(f"ablation-{v}", corpus, data, python, args.models, args.timeout, args.reuse,
                               edgeq_flags=VARIANTS[v][1]) for v in variants}
        print(table(runs))
        return
    names = args.models.split(",") if args.models else [*ZOO, "digits_cnn", "digits_transformer"]
    rows = []
    for name in names:
        rows += bench_model(name, args.work, args.calib, args.repeats, variants)
        print(f"[ablation] {name} done", file=sys.stderr, flush=True)
        print_table(rows[-len(variants):], header=not rows[:-len(variants)])
        sys.stdout.flush()


if __name__ == "__main__":
    main()
