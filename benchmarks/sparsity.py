"""2:4 sparsity: accuracy on the trained digits models, and pruning time and fidelity on the zoo.

    python benchmarks/sparsity.py [--models resnet18,mobilenetv2,bert_small] [--calib 64] [--skip-zoo]

Every row is one ``compile_model`` for the jetson-orin target (its 2:4 rules: Conv/Gemm/MatMul with ≥ 32
input and output channels, input channels a multiple of 16), latency not measured (no GPU here).
- digits (examples/, trained on scikit-learn's digits): accuracy of float, of int8 alone, of the 2:4 float
  model and of 2:4 + int8, for magnitude pruning and OBS reconstruction, each with and without the channel
  permutation search.
- zoo (random weights, BN statistics set on synthetic data): wall time of the whole 2:4 stage (layer input
  statistics, permutation when asked, pruning, one fidelity check), eligible / pruned layers, mean relative
  layer output error (magnitude → chosen), worst-output SQNR of the 2:4 float model vs float.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_ort_quantizer import export, write_feeds  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.pipeline import CompileRequest, compile_model  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402
from edgeq.target import load_target  # noqa: E402

EXAMPLES = HERE.parent / "examples"
TARGET = "jetson-orin"
VARIANTS = {"int8 only": None, "magnitude": ("magnitude", False), "magnitude+perm": ("magnitude", True),
            "reconstruct": ("reconstruct", False), "reconstruct+perm": ("reconstruct", True)}


def compile_once(model: Path, calib: Path, work: Path, variant, eval_path: Path | None = None,
                 metric: str | None = None) -> tuple[dict, float]:
    recipe = Recipe(optional_ops="all")
    if variant is not None:
        recipe = replace(recipe, sparsity="2:4", sparsity_method=variant[0], sparsity_permute=variant[1])
    out = Path(tempfile.mkdtemp(dir=work)) / "out"
    request = CompileRequest(model=model, target=load_target(TARGET), recipe=recipe, out_dir=out, calib=calib,
                             eval=eval_path, metric=metric, cache_dir=None, measure=False)
    started = time.perf_counter()
    manifest, _ = compile_model(request)
    return manifest, time.perf_counter() - started


def _layer_errors(sparsity: dict) -> tuple[float, float]:
    pruned = [layer for layer in sparsity["layers"].values() if layer["pruned"]]
    if not pruned:
        return float("nan"), float("nan")
    return (float(np.mean([layer["magnitude_error"] for layer in pruned])),
            float(np.mean([layer["error"] for layer in pruned])))


def digits_table(work: Path) -> None:
    print("\n## digits (accuracy on the 360 held-out test images)\n")
    print("| model | variant | float | 2:4 float | delivered int8 | pruned/eligible | layer error mag→chosen "
          "| compressed/dense | 2:4 stage s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for example in ("digits_cnn", "digits_transformer"):
        folder = EXAMPLES / example
        for label, variant in VARIANTS.items():
            manifest, _ = compile_once(folder / "model.onnx", folder / "calib.npz", work, variant,
                                       folder / "eval.npz", str(EXAMPLES / "metric.py") + ":accuracy")
            metric = manifest["fidelity"]["metric"]
            sparsity = manifest.get("sparsity")
            if sparsity is None:
                print(f"| {example} | {label} | {metric['float']:.4f} | - | {metric['candidate']:.4f} | - | - | - | - |")
                continue
            sparse_float = metric["float"] - sparsity["search"][0]["drop"]
            mag, chosen = _layer_errors(sparsity)
            print(f"| {example} | {label} | {metric['float']:.4f} | {sparse_float:.4f} | {metric['candidate']:.4f} "
                  f"| {sparsity['pruned']}/{sparsity['eligible']} | {mag:.4f} → {chosen:.4f} "
                  f"| {sparsity['check']['bytes_ratio']:.3f} | {sparsity['seconds']:.1f} |", flush=True)


def zoo_table(work: Path, names: list[str], calib_count: int) -> None:
    print(f"\n## zoo ({calib_count} calibration feeds, 20% held back)\n")
    print("| model | variant | eligible / layers | pruned | 2:4 stage s | compile s | layer error mag→chosen "
          "| SQNR 2:4 float dB | permutation kept (mean, before→after) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        entry = ZOO[name]
        folder = work / name
        folder.mkdir(exist_ok=True)
        model = folder / "model.onnx"
        export(entry, model)
        feeds = write_feeds(entry, folder / "calib", calib_count, seed=1)
        for label in ("reconstruct", "reconstruct+perm", "magnitude"):
            manifest, seconds = compile_once(model, feeds, work, VARIANTS[label])
            sparsity = manifest["sparsity"]
            mag, chosen = _layer_errors(sparsity)
            permuted = [p for p in sparsity.get("permutation", {}).values() if p.get("permuted")]
            perm = (f"{len(permuted)} layers, {np.mean([p['kept_before'] for p in permuted]):.3f} → "
                    f"{np.mean([p['kept_after'] for p in permuted]):.3f}") if permuted else "-"
            print(f"| {name} | {label} | {sparsity['eligible']} / {len(sparsity['layers'])} | {sparsity['pruned']} "
                  f"| {sparsity['seconds']:.1f} | {seconds:.1f} | {mag:.4f} → {chosen:.4f} "
                  f"| {sparsity['search'][0]['sqnr_db']:.1f} | {perm} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenetv2,bert_small")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    work = HERE.parent / "build" / "bench-sparsity"
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_digits:
        digits_table(work)
    if not args.skip_zoo:
        zoo_table(work, args.models.split(","), args.calib)


if __name__ == "__main__":
    main()
