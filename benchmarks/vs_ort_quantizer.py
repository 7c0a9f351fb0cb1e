"""edgeq vs ONNX Runtime's quantize_static on the zoo, measured side by side in one process.

    python benchmarks/vs_ort_quantizer.py [--models resnet18,bert_small] [--calib 64] [--repeats 30]
    python benchmarks/vs_ort_quantizer.py --memory   # calibration peak memory, BERT-small, 256 samples

For every zoo model: export to ONNX, write calibration feeds (and 8 separate evaluation feeds), then
- edgeq: ``compile_model`` on the x86-avx512-vnni target (defaults: percentile calibration, measured op set,
  no-slowdown check on);
- ORT default: ``quantize_static`` with its defaults (QDQ, s8 activations, per-tensor weights);
- ORT x86: ``quantize_static`` with u8 activations, per-channel s8 weights, Conv/MatMul/Gemm only.
All four models (fp32 and the three int8) then run interleaved in one process, 1 thread, on one feed.
Columns: int8/fp32 latency for each, edgeq/ORT latency, SQNR (worst output, dB) and top-1 agreement with fp32
on the evaluation feeds, quantization wall time (edgeq's includes its measurements), the peak memory growth
of a percentile calibration on the same feeds, edgeq's vs ORT's calibrator, each in a fresh process, and the
model files' sizes (fp32, edgeq, ORT default, ORT x86). Only
ratios are meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from zoo import ZOO, build_module  # noqa: E402

from edgeq.calibration_data import CalibrationData, input_specs  # noqa: E402
from edgeq.fidelity import FidelityMeter  # noqa: E402
from edgeq.pipeline import CompileRequest, compile_model  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402
from edgeq.runtimes.base import measure_interleaved  # noqa: E402
from edgeq.target import load_target  # noqa: E402

TARGET = "x86-avx512-vnni"


class FeedReader(CalibrationDataReader):
    def __init__(self, folder: Path):
        self.files = sorted(folder.glob("*.npz"))
        self.rewind()

    def rewind(self):
        self._it = iter(self.files)

    def get_next(self):
        path = next(self._it, None)
        return None if path is None else dict(np.load(path))


def export(entry, path: Path) -> None:
    import torch

    module = build_module(entry)
    if entry.legacy_export:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(entry.shape),), str(path), input_names=[entry.input_name],
                              dynamo=False, opset_version=17)
    else:
        from edgeq.export import export_module

        export_module(module, [(entry.input_name, list(entry.shape), entry.dtype)], path, dynamic_batch=False,
                      tolerance=1e-3)


def write_feeds(entry, folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.savez(folder / f"{i:04d}.npz", **{entry.input_name: entry.sample(rng, entry.shape)})
    return folder


def ort_quantize(src: Path, dst: Path, feeds: Path, x86: bool) -> float:
    started = time.perf_counter()
    options = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                   op_types_to_quantize=["Conv", "MatMul", "Gemm"]) if x86 else {}
    quantize_static(str(src), str(dst), FeedReader(feeds), quant_format=QuantFormat.QDQ, **options)
    return time.perf_counter() - started


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fidelity(ref: ort.InferenceSession, test: ort.InferenceSession, feeds: list[dict]) -> tuple[float, float | None]:
    names = [o.name for o in ref.get_outputs()]
    meter = FidelityMeter(names)
    for feed in feeds:
        meter.update(ref.run(None, feed), test.run(None, feed))
    outputs = meter.summary()["outputs"].values()
    top1 = [o["top1_agreement"] for o in outputs if "top1_agreement" in o]
    return min(o["sqnr_db"] for o in outputs), (min(top1) if top1 else None)


def prepare(entry, folder: Path, calib_count: int, eval_count: int) -> tuple[Path, Path, Path]:
    """The zoo model exported once into ``folder``, with seeded calibration and evaluation feeds."""
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    if not fp32.exists():
        export(entry, fp32)
    return (fp32, write_feeds(entry, folder / "calib", calib_count, seed=1),
            write_feeds(entry, folder / "eval", eval_count, seed=2))


def bench_model(name: str, work: Path, calib_count: int, repeats: int) -> dict:
    entry = ZOO[name]
    folder = work / name
    fp32, calib, evalf = prepare(entry, folder, calib_count, 8)
    started = time.perf_counter()
    manifest, _ = compile_model(CompileRequest(model=fp32, target=load_target(TARGET), recipe=Recipe(latency_repeats=20),
                                               out_dir=folder / "edgeq", calib=calib, eval=evalf, cache_dir=None))
    edgeq_seconds = time.perf_counter() - started
    ort_default_s = ort_quantize(fp32, folder / "ort_default.onnx", calib, x86=False)
    ort_x86_s = ort_quantize(fp32, folder / "ort_x86.onnx", calib, x86=True)

    paths = {"fp32": fp32, "edgeq": folder / "edgeq" / "model.onnx", "ort_default": folder / "ort_default.onnx",
             "ort_x86": folder / "ort_x86.onnx"}
    sessions = {k: session(p) for k, p in paths.items()}
    feeds = [dict(np.load(p)) for p in sorted(evalf.glob("*.npz"))]
    feed = feeds[0]
    latency = measure_interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, warmup=3,
                                  repeats=repeats)
    base = latency["fp32"].median_ms
    row = {"model": name, "fp32_ms": base, "delivered": manifest["delivered"]["precision"],
           "edgeq_seconds": edgeq_seconds, "edgeq_calib_seconds": manifest["calibration"]["seconds"],
           "ort_default_seconds": ort_default_s, "ort_x86_seconds": ort_x86_s,
           "file_mb": {k: p.stat().st_size / 1e6 for k, p in paths.items()}}
    for key in ("edgeq", "ort_default", "ort_x86"):
        row[f"{key}_ratio"] = latency[key].median_ms / base
        row[f"{key}_sqnr"], row[f"{key}_top1"] = fidelity(sessions["fp32"], sessions[key], feeds)
    row["edgeq_vs_best_ort"] = latency["edgeq"].median_ms / min(latency["ort_default"].median_ms,
                                                                 latency["ort_x86"].median_ms)
    del sessions
    # calibration peak memory, each calibrator in a fresh process: edgeq's streaming histograms vs ORT's
    row["edgeq_calib_mb"], _, _ = _peak_growth("edgeq", fp32, calib, "percentile")
    row["ort_calib_mb"], _, row["ort_calib_capped"] = _peak_growth("ort", fp32, calib, "percentile")
    return row


def print_table(rows: list[dict]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = (f"{'model':<13}{'fp32 ms':>9}{'edgeq/fp32':>11}{'ortdef/fp32':>12}{'ortx86/fp32':>12}"
              f"{'edgeq/bestORT':>14}{'SQNR e/d/x dB':>20}{'top1 e/d/x':>18}{'quant s e/d/x':>18}"
              f"{'calib MB e/ORT':>17}{'file MB f/e/d/x':>22}  delivered")
    print(header)
    print("-" * len(header))
    for r in rows:
        sq = f"{f(r['edgeq_sqnr'], '.1f')}/{f(r['ort_default_sqnr'], '.1f')}/{f(r['ort_x86_sqnr'], '.1f')}"
        t1 = f"{f(r['edgeq_top1'], '.2f')}/{f(r['ort_default_top1'], '.2f')}/{f(r['ort_x86_top1'], '.2f')}"
        qs = f"{r['edgeq_seconds']:.0f}/{r['ort_default_seconds']:.0f}/{r['ort_x86_seconds']:.0f}"
        mb = f"{r['edgeq_calib_mb']:.0f}/{'>' if r['ort_calib_capped'] else ''}{r['ort_calib_mb']:.0f}"
        files = "/".join(f"{r['file_mb'][k]:.1f}" for k in ("fp32", "edgeq", "ort_default", "ort_x86"))
        print(f"{r['model']:<13}{r['fp32_ms']:>9.2f}{r['edgeq_ratio']:>11.2f}{r['ort_default_ratio']:>12.2f}"
              f"{r['ort_x86_ratio']:>12.2f}{r['edgeq_vs_best_ort']:>14.2f}{sq:>20}{t1:>18}{qs:>18}{mb:>17}"
              f"{files:>22}  {r['delivered']}")
    ratios = [r["edgeq_ratio"] for r in rows]
    print(f"\ngeo-mean edgeq int8/fp32: {float(np.exp(np.mean(np.log(ratios)))):.3f} over {len(rows)} models")


# --- calibration memory ------------------------------------------------------------------------------------
MEMORY_CAP_MB = 18 * 1024  # a calibrator past this is stopped (the machine has 24 GiB)


def _calibrate_child(kind: str, model: str, feeds: str, method: str, queue) -> None:
    """Runs in a fresh process; reports its resident memory before calibrating, then the time taken."""
    import psutil

    from edgeq.model_io import load_model
    from edgeq.passes.calibrate import CalibratePass
    from edgeq.passes.normalize import NormalizePass
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    queue.put(psutil.Process().memory_info().rss / 2**20)
    started = time.perf_counter()
    if kind == "edgeq":
        m = load_model(model)
        NormalizePass()(m)
        rules = load_target(TARGET).quantization
        ops = set(rules.compute_ops + rules.requant_ops + rules.passthrough_ops + rules.activation_fusions)
        CalibratePass(CalibrationData.from_path(feeds, input_specs(m)), ops, method)(m)
    else:
        ort_method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[method]
        calibrator = create_calibrator(model, None, augmented_model_path=str(Path(feeds).parent / "aug.onnx"),
                                       calibrate_method=ort_method)
        calibrator.collect_data(FeedReader(Path(feeds)))
        calibrator.compute_data()
    queue.put(time.perf_counter() - started)


def _peak_growth(kind: str, model: Path, feeds: Path, method: str) -> tuple[float, float, bool]:
    """(peak RSS growth MB while calibrating, seconds, stopped at the cap) — polled from outside."""
    import psutil

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_calibrate_child, args=(kind, str(model), str(feeds), method, queue))
    proc.start()
    baseline = queue.get()
    peak, capped = baseline, False
    watched = psutil.Process(proc.pid)
    while proc.is_alive():
        try:
            peak = max(peak, watched.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        if peak > MEMORY_CAP_MB:
            proc.kill()
            capped = True
            break
        time.sleep(0.05)
    proc.join()
    seconds = float("nan") if capped or proc.exitcode else queue.get()
    return peak - baseline, seconds, capped


def memory_bench(work: Path, samples: int) -> None:
    entry = ZOO["bert_small"]
    folder = work / "bert_small"
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    if not fp32.exists():
        export(entry, fp32)
    feeds = write_feeds(entry, folder / f"calib{samples}", samples, seed=3)
    print(f"calibration peak memory, bert_small, {samples} samples (peak RSS growth of a fresh process, "
          f"stopped past {MEMORY_CAP_MB} MB)")
    print(f"{'method':<12}{'edgeq MB':>10}{'ORT MB':>12}{'edgeq/ORT':>11}{'edgeq s':>9}{'ORT s':>9}")
    for method in ("percentile", "entropy"):
        e_mb, e_s, _ = _peak_growth("edgeq", fp32, feeds, method)
        o_mb, o_s, capped = _peak_growth("ort", fp32, feeds, method)
        ort_text = f">{o_mb:.0f}" if capped else f"{o_mb:.0f}"
        print(f"{method:<12}{e_mb:>10.0f}{ort_text:>12}{e_mb / o_mb:>11.3f}{e_s:>9.1f}{o_s:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--calib", type=int, default=64, help="calibration samples per model")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--memory", action="store_true", help="only the calibration memory benchmark")
    parser.add_argument("--memory-samples", type=int, default=256)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.memory:
        memory_bench(args.work, args.memory_samples)
        return
    rows = []
    for name in args.models.split(","):
        print(f"… {name}", file=sys.stderr, flush=True)
        rows.append(bench_model(name, args.work, args.calib, args.repeats))
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
