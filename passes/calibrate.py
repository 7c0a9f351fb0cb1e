"""Collect activation ranges on real data.

Rules:
- Observed tensors: the float inputs and outputs of every main-graph node whose op type the target can run in
  integers (``op_types``), graph inputs included, constants excluded.
- The model runs in ONNX Runtime with those tensors added as outputs, one feed at a time; each tensor's
  observer (``edgeq.observers``) updates and the outputs are dropped. Memory does not grow with the
  number of feeds.
- Ranges are cached on disk under ``cache_dir`` keyed by (model hash, data hash, method, percentile, tensors);
  a cache hit skips the run.

This is a side-effect-only pass: the model is not changed; the result is :attr:`CalibratePass.ranges`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir

from edgeq.calibration_data import CalibrationData
from edgeq.model_io import save_model, to_proto
from edgeq.observers import make_observer


def observed_values(model: ir.Model, op_types: set[str]) -> list[ir.Value]:
    seen: dict[str, ir.Value] = {}
    for node in model.graph:
        if node.op_type not in op_types:
            continue
        for value in (*node.inputs, *node.outputs):
            if (value is not None and value.name and value.const_value is None
                    and value.dtype == ir.DataType.FLOAT and not value.is_initializer()):
                seen.setdefault(value.name, value)
    return list(seen.values())


class CalibratePass(ir.passes.PassBase):
    in_place = True
    changes_input = False

    def __init__(self, data: CalibrationData, op_types: set[str], method: str = "minmax",
                 percentile: float = 99.999, model_digest: str = "", cache_dir: Path | None = None,
                 threads: int = 0, on_progress: Callable[[int, int], None] | None = None):
        super().__init__()
        self.data = data
        self.op_types = set(op_types)
        self.method = method
        self.percentile = percentile
        self.model_digest = model_digest
        self.cache_dir = cache_dir
        self.threads = threads
        self.on_progress = on_progress
        self.ranges: dict[str, tuple[float, float]] = {}
        self.cache_hit = False

    def _cache_file(self, names: list[str]) -> Path | None:
        if self.cache_dir is None or not self.model_digest:
            return None
        key = hashlib.sha256(json.dumps(
            [self.model_digest, self.data.digest, self.method, self.percentile, names]).encode()).hexdigest()
        return self.cache_dir / "calibration" / f"{key[:32]}.json"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = observed_values(model, self.op_types)
        names = [v.name for v in values]
        cache = self._cache_file(names)
        if cache is not None and cache.is_file():
            self.ranges = {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
            self.cache_hit = True
            return ir.passes.PassResult(model, modified=False)
        self.ranges = self._observe(model, names)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.ranges, indent=0, sort_keys=True))
            tmp.replace(cache)
        return ir.passes.PassResult(model, modified=False)

    def _observe(self, model: ir.Model, names: list[str]) -> dict[str, tuple[float, float]]:
        from edgeq.runtimes.onnxruntime import create_session

        proto = to_proto(model)
        existing = {o.name for o in proto.graph.output}
        for name in names:
            if name not in existing:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        observers = {name: make_observer(self.method, self.percentile) for name in names}
        with tempfile.TemporaryDirectory(prefix="edgeq-calib-") as tmp:
            path = save_model(proto, Path(tmp) / "augmented.onnx")
            del proto
            session = create_session(path, intra_op_threads=self.threads)
            total = len(self.data)
            for i, feed in enumerate(self.data):
                outputs = session.run(names, feed.inputs)
                for name, value in zip(names, outputs):
                    observers[name].update(value)
                if self.on_progress:
                    self.on_progress(i + 1, total)
        return {name: tuple(float(v) for v in obs.range()) for name, obs in observers.items()}
