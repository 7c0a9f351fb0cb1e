"""``edgeq bench``: latency of one model, or two interleaved, with the target's runtime settings.

With ``--runtime tvm`` each ONNX model is first built with TVM (schedules from the target's tuning database
where it has them, TVM's defaults elsewhere; no tuning), and ONNX Runtime's latency for MODEL is measured in
the same interleaved run when the target is local.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path


from edgeq.devices import open_device
from edgeq.devices.rpc import rpc_address
from edgeq import scratch
from edgeq.calibration_data import CalibrationData, input_specs
from edgeq.errors import UserError
from edgeq.model_check import load_in_onnxruntime, run_feeds
from edgeq.model_io import load_model, load_proto
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import Target


def bench_models(model: Path, target: Target, feeds: Path | None, compare: Path | None, repeats: int,
                 runtime: str = "onnxruntime", cache_dir: Path | None = None) -> dict:
    with contextlib.closing(open_device(target.measure_where)) as device:
        why = device.check(target, runtime)
        if why:
            raise UserError(f"device {device.address} cannot measure {target.name}: {why}",
                            "measure on the device itself (--device ssh://… or rpc://…)")
        return _bench(model, target, feeds, compare, repeats, runtime, cache_dir, device)


def _bench(model: Path, target: Target, feeds: Path | None, compare: Path | None, repeats: int, runtime: str,
           cache_dir: Path | None, device) -> dict:
    paths = [Path(model)] + ([Path(compare)] if compare else [])
    specs = input_specs(load_model(model))
    for other in paths[1:]:
        load_proto(other)
    data = CalibrationData.from_path(feeds, specs) if feeds else CalibrationData.random(specs, count=1)
    feed = next(iter(data)).inputs
    for path in paths:  # a model ONNX Runtime cannot load or run on this feed is the user's to fix
        run_feeds(load_in_onnxruntime(path), [feed], f"model {path.name}")
    report = {"target": target.name, "runtime": runtime, "random_inputs": feeds is None}
    if runtime == "tvm":
        return report | _bench_tvm(paths, target, feed, repeats, cache_dir)
    ort = OnnxRuntime(target, device)
    latency = ort.measure({str(p): p for p in paths}, feed, repeats=repeats)
    return report | {"latency": {k: v.to_dict() for k, v in latency.items()},
                     "profile": [asdict(t) for t in ort.profile(paths[0], feed)]}


def _bench_tvm(paths: list[Path], target: Target, feed: dict, repeats: int, cache_dir: Path | None) -> dict:
    from edgeq.runtimes import tvm_tuning
    from edgeq.runtimes.tvm import TvmRuntime

    folder = tvm_tuning.database_dir(cache_dir, target) if cache_dir else None
    database = tvm_tuning.open_database(folder) if folder and folder.is_dir() else None
    runtime = TvmRuntime(target, database, feed)
    with scratch.scratch_dir("bench") as work:
        libraries = {}
        for index, path in enumerate(paths):
            (Path(work) / str(index)).mkdir()
            libraries[str(path)] = runtime.build(path, Path(work) / str(index))
        latency = runtime.measure_with_onnxruntime(libraries, paths[0], feed, repeats=repeats,
                                                   ort_name=f"onnxruntime: {paths[0]}")
        profile = runtime.profile(libraries[str(paths[0])], feed) if rpc_address(target) is None else []
    return {"database": str(folder) if database is not None else None,
            "latency": {k: v.to_dict() for k, v in latency.items()}, "profile": [asdict(t) for t in profile]}
