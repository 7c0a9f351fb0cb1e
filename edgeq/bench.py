"""``edgeq bench``: latency of one model, or two interleaved, with the target's runtime settings."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import onnx_ir as ir

from edgeq.calibration_data import CalibrationData, input_specs
from edgeq.errors import UserError
from edgeq.model_io import load_proto
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import Target


def bench_models(model: Path, target: Target, feeds: Path | None, compare: Path | None, repeats: int) -> dict:
    ok, why = target.can_measure_here()
    if not ok:
        raise UserError(f"cannot measure {target.name} here: {why}", "run edgeq bench on the device itself")
    paths = [Path(model)] + ([Path(compare)] if compare else [])
    specs = input_specs(ir.from_proto(load_proto(model)))
    for other in paths[1:]:
        load_proto(other)
    data = CalibrationData.from_path(feeds, specs) if feeds else CalibrationData.random(specs, count=1)
    feed = next(iter(data)).inputs
    runtime = OnnxRuntime(target)
    latency = runtime.measure({str(p): p for p in paths}, feed, repeats=repeats)
    return {"target": target.name, "random_inputs": feeds is None,
            "latency": {k: v.to_dict() for k, v in latency.items()},
            "profile": [asdict(t) for t in runtime.profile(paths[0], feed)]}
