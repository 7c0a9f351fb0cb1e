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
from edgeq.model_io import load_model
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
    feed = measurement_feed(paths, feeds)
    report = {"target": target.name, "runtime": runtime, "random_inputs": feeds is None}
    if runtime == "tvm":
        return report | _bench_tvm(paths, target, feed, repeats, cache_dir)
    ort = OnnxRuntime(target, device)
    latency = ort.measure({str(p): p for p in paths}, feed, repeats=repeats)
    return report | {"latency": {k: v.to_dict() for k, v in latency.items()},
                     "profile": [asdict(t) for t in ort.profile(paths[0], feed)]}


def _bench_tvm(paths: list[Path], target: Target, feed: dict, repeats: int, cache_dir: Path | None) -> dict:
    with tvm_libraries(paths, target, feed, cache_dir) as (runtime, libraries, database):
        latency = runtime.measure_with_onnxruntime(libraries, paths[0], feed, repeats=repeats,
                                                   ort_name=f"onnxruntime: {paths[0]}")
        profile = runtime.profile(libraries[str(paths[0])], feed) if rpc_address(target) is None else []
    return {"database": database, "latency": {k: v.to_dict() for k, v in latency.items()},
            "profile": [asdict(t) for t in profile]}


def measurement_feed(paths: list[Path], feeds: Path | None) -> dict:
    """The one feed ``paths`` are measured on: the first of ``feeds``, else random inputs of the first model's.
    Every model must take the first one's inputs (names, types, fixed dims) and run on the feed in ONNX Runtime:
    otherwise it is the user's to fix."""
    specs = input_specs(load_model(paths[0]))
    for other in paths[1:]:
        why = _inputs_differ(specs, input_specs(load_model(other)))
        if why:
            raise UserError(f"--compare model {other.name} does not take {paths[0].name}'s inputs ({why})",
                            "compare builds of the same model (same input names, types and shapes)")
    data = CalibrationData.from_path(feeds, specs) if feeds else CalibrationData.random(specs, count=1)
    feed = next(iter(data)).inputs
    for path in paths:  # a model ONNX Runtime cannot load or run on this feed is the user's to fix
        run_feeds(load_in_onnxruntime(path), [feed], f"model {path.name}")
    return feed


def _inputs_differ(specs: list, others: list) -> str:
    """How the inputs ``others`` differ from ``specs`` ('' when a feed of one fits the other: dynamic dims
    match any size)."""
    mine, theirs = {s.name: s for s in specs}, {s.name: s for s in others}
    if set(mine) != set(theirs):
        return f"inputs {', '.join(sorted(theirs))} vs {', '.join(sorted(mine))}"
    for name, spec in mine.items():
        other = theirs[name]
        fits = spec.shape is None or other.shape is None or (
            len(spec.shape) == len(other.shape)
            and all(a is None or b is None or a == b for a, b in zip(spec.shape, other.shape)))
        if other.dtype != spec.dtype or not fits:
            return f"{other.describe()} vs {spec.describe()}"
    return ""


@contextlib.contextmanager
def tvm_libraries(paths: list[Path], target: Target, feed: dict, cache_dir: Path | None):
    """Each model built with TVM for the feed's shapes, in a scratch folder removed on exit (tuned schedules
    from the target's tuning database where it has them; no tuning). Yields the runtime, the libraries by model
    path and the database folder used (None: TVM's default schedules only)."""
    from edgeq.runtimes import tvm_tuning
    from edgeq.runtimes.tvm import TvmRuntime

    folder = tvm_tuning.database_dir(cache_dir, target) if cache_dir else None
    database = tvm_tuning.open_database(folder) if folder and folder.is_dir() else None
    runtime = TvmRuntime(target, database, feed)
    with scratch.scratch_dir("tvm-build") as work:
        libraries = {}
        for index, path in enumerate(paths):
            (Path(work) / str(index)).mkdir()
            libraries[str(path)] = runtime.build(path, Path(work) / str(index))
        yield runtime, libraries, str(folder) if database is not None else None
