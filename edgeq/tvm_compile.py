"""``edgeq compile --runtime tvm``: a float model → one tuned TVM library for the target, checked and measured.

    load → normalize → import into Relax → [tune with MetaSchedule] → build model.so → check vs ONNX Runtime
         → latency: ORT fp32 · TVM untuned · TVM tuned, interleaved → artifact

Rules:
- Float only. Quantized models go to ONNX Runtime: TVM 0.27 imports ONNX QDQ as float quantize/dequantize
  around float kernels (no integer compute), which is slower than the float model, so a QDQ model is refused
  rather than built slower (the README's measured figures say by how much).
- Tuning times candidates where the library runs: on this machine (its CPU must have the target's instruction
  set) or on an RPC board; a target neither can run is refused ``--tune-trials`` (built untuned, it is allowed).
- Feeds: ``--eval`` or else ``--calib`` (up to :data:`CHECK_FEEDS`), or else seeded random inputs; the library
  is built for their shapes.
- Check: where the library runs here (same architecture; a CUDA GPU for CUDA) or on an RPC board, its outputs
  are compared with ONNX Runtime's on the same feeds; a relative error over :data:`TOLERANCE` (max |tvm - ort|
  / max |ort|, per output) fails the compile (exit 3, artifact written for inspection).
- Latency (where it can be measured): tuned, untuned (TVM's default schedules only) and, locally, ONNX Runtime
  fp32 on the target's settings, in one interleaved run; tuning time and trials go in the manifest.
- A locked build (``edgeq build --locked``) tunes nothing: the tuning database must still hold the records the
  lock names (the SHA-256 of its files), and the build applies them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.devices import open_device
from edgeq import scratch
from edgeq.artifact import MODEL, ArtifactWriter, tool_versions
from edgeq.calibration_data import CalibrationData, input_specs
from edgeq.errors import EXIT_BUDGET_MISSED, EXIT_OK, UserError
from edgeq.lock import path_digest
from edgeq import model_check
from edgeq.model_check import max_relative_error, normalize_checked
from edgeq.model_io import folder_bytes, load_model, model_digest
from edgeq.passes.normalize import quantized_ops_in
from edgeq.runtimes import tvm_tuning
from edgeq.runtimes.onnxruntime import create_session
from edgeq.runtimes.tvm import LIBRARY, TvmRuntime, library_arch, refuse_quantized

CHECK_FEEDS = 8
TOLERANCE = 1e-4


def compile_tvm(request, reporter) -> tuple[dict, int]:
    """Run the TVM compile and publish the artifact; returns (manifest, exit code)."""
    target, recipe = request.target, request.recipe
    why_not = open_device(target.measure_where).check(target, "tvm")
    can_run = not why_not
    if recipe.tune_trials and not can_run:  # candidates are timed where the library runs
        raise UserError(f"cannot tune {target.name} here: {why_not}",
                        "tune on the device (--device rpc://TRACKER_HOST:PORT/KEY), or drop --tune-trials")
    with ArtifactWriter(request.out_dir, request.input_paths, request.artifact_room) as writer, scratch.scratch_dir("tvm") as work:
        with reporter.stage("load"):
            model = load_model(request.model)
            source = model_check.runtime_readable(model, Path(request.model), work / "source")
            refuse_quantized(Path(request.model).name, quantized_ops_in(model))
            source_digest = model_digest(model)
        data, random_inputs = _feeds(request, model)
        feeds = [f.inputs for f, _ in zip(data, range(CHECK_FEEDS))]
        with reporter.stage("normalize"):
            (work / "float").mkdir()
            float_path = work / "float" / MODEL
            normalize_checked(model, source, feeds[:model_check.CHECK_FEEDS], float_path)
        database = tuning = None
        if recipe.tune_trials:
            folder = tvm_tuning.database_dir(request.cache_dir or work / "cache", target)
            database = tvm_tuning.open_database(folder)
        runtime = TvmRuntime(target, database, feeds[0])
        with reporter.stage("import into TVM Relax"):
            fused = runtime.lower(float_path)
            tasks = len(tvm_tuning.tasks_of(fused, runtime.tvm_target))
        records = None
        if database is not None and request.replay is not None:  # a locked build tunes nothing
            records = path_digest(folder)
            if records != request.replay.tuning_records:
                raise UserError(f"the tuning database {folder} changed since the lock was written",
                                "restore it (the lock replays the records it was built with), or --relock")
        elif database is not None:
            with reporter.stage(f"tune with MetaSchedule (up to {recipe.tune_trials} trials)"):
                tuning = tvm_tuning.tune(fused, target, recipe.tune_trials, database, folder, reporter.progress)
            records = path_digest(folder)
        with reporter.stage(f"build {LIBRARY} for {target.tvm.arch}"):
            library = runtime.build(float_path, writer.tmp)
        check, latency = {"run": False, "why": why_not}, {"measured": False, "why": why_not}
        if can_run and request.measure:
            untuned = None
            if database is not None:
                with reporter.stage("build untuned (for the before/after latency)"):
                    untuned = TvmRuntime(target, None, feeds[0]).build(float_path, work)
            with reporter.stage("measure latency"):
                latency = _measure(runtime, float_path, library, untuned, feeds[0], recipe)
        if can_run:
            with reporter.stage(f"check outputs vs ONNX Runtime on {len(feeds)} feeds"):
                check = _check(runtime.session(library), float_path, feeds)
        manifest = _manifest(request, source_digest, data.describe() | {"random": random_inputs}, runtime, tasks,
                             library, float_path, tuning, check, latency)
        manifest["tvm"]["tuning_records"] = records
        writer.publish(manifest, request.expected_files)
    failed = check["run"] and not check["ok"]
    return manifest, EXIT_BUDGET_MISSED if failed else EXIT_OK


def _manifest(request, source_digest: str, feeds_info: dict, runtime: TvmRuntime, tasks: int, library: Path,
              float_path: Path, tuning, check: dict, latency: dict) -> dict:
    return {
        "edgeq": "artifact/1",
        "tools": tool_versions(("apache-tvm",)),
        "inputs": {"model": {"name": Path(request.model).name, "sha256": source_digest}, "feeds": feeds_info},
        "target": request.target.to_dict(),
        "recipe": request.recipe.to_dict(),
        "delivered": {"runtime": "tvm", "precision": "float", "file": LIBRARY, "arch": library_arch(library),
                      "bytes": library.stat().st_size, "float_bytes": folder_bytes(float_path.parent),
                      "input_shapes": {k: list(np.shape(v)) for k, v in runtime.feed.items()},
                      "reason": _reason(tuning, latency)},
        "tvm": {"target": str(runtime.tvm_target), "tasks": tasks,
                "tuning": tuning.to_dict() if tuning else None, "check": check}
        | ({"cuda_kernels": runtime.cuda_kernels} if runtime.cuda_kernels else {}),
        "latency": latency,
    }


def _feeds(request, model) -> tuple[CalibrationData, bool]:
    specs = input_specs(model)
    path = request.eval or request.calib
    if path is not None:
        return CalibrationData.from_path(path, specs), False
    return CalibrationData.random(specs, count=CHECK_FEEDS, seed=request.recipe.seed), True


def _measure(runtime: TvmRuntime, float_path: Path, library: Path, untuned: Path | None, feed: dict, recipe) -> dict:
    libraries = {"tvm": library} | ({"tvm_untuned": untuned} if untuned is not None else {})
    measured = runtime.measure_with_onnxruntime(libraries, float_path, feed, recipe.latency_warmup,
                                                recipe.latency_repeats)
    result = {name: lat.to_dict() for name, lat in measured.items()}
    remote = runtime.target.measure_where != "local"
    result["device"] = {"address": runtime.target.measure_where,  # a board times each run itself (time_evaluator)
                        "timed_by": "the board's own timer, per run" if remote else "this process"}
    for other in ("onnxruntime", "tvm_untuned"):
        if other in measured:
            result[f"tvm_over_{other}"] = measured["tvm"].median_ms / measured[other].median_ms
    return result


def _check(session, float_path: Path, feeds: list[dict]) -> dict:
    """The library's outputs vs ONNX Runtime's (CPU, on this machine) for the float model."""
    reference = create_session(float_path)
    error = max(max_relative_error(reference.run(None, dict(f)), session.run(f)) for f in feeds)
    return {"run": True, "feeds": len(feeds), "max_relative_error": error, "tolerance": TOLERANCE,
            "ok": error <= TOLERANCE}


def _reason(tuning, latency: dict) -> str:
    if tuning is None:
        return "untuned: TVM's default schedules only (pass --tune-trials to tune)"
    hit = " (database hit: nothing to tune)" if tuning.hit else ""
    ratio = latency.get("tvm_over_onnxruntime")
    return f"tuned with {tuning.trials_in_database_before + tuning.trials_run} trials{hit}" + (
        f"; ×{ratio:.2f} ONNX Runtime fp32 latency" if ratio is not None else "")

