"""Collect activation ranges on real data.

Rules:
- Observed tensors: the float inputs and outputs of every main-graph node whose op type the target can run in
  integers (``op_types``), graph inputs included, constants excluded; and the same inside the branches of
  main-graph ``If`` nodes, which a calibration copy of the model returns as extra If outputs (the branch not
  taken returns an empty tensor, which observers skip). Loop/Scan bodies are not observed.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeq.calibration_data import CalibrationData
from edgeq.model_io import to_proto
from edgeq.observers import make_observer


def _graph_values(graph: ir.Graph, op_types: set[str]) -> dict[str, ir.Value]:
    """Float non-constant inputs/outputs of this graph's nodes whose op type is in ``op_types``."""
    seen: dict[str, ir.Value] = {}
    for node in graph:
        if node.op_type not in op_types:
            continue
        for value in (*node.inputs, *node.outputs):
            if (value is not None and value.name and value.const_value is None
                    and value.dtype == ir.DataType.FLOAT and not value.is_initializer()):
                seen.setdefault(value.name, value)
    return seen


def _branches(node: ir.Node) -> list[ir.Graph]:
    return [node.attributes[k].as_graph() for k in ("then_branch", "else_branch") if k in node.attributes]


def _made_inside(value: ir.Value, graph: ir.Graph) -> bool:
    return value.producer() is not None and value.producer().graph is graph


def observed_values(model: ir.Model, op_types: set[str]) -> list[ir.Value]:
    """Main-graph values, then values used inside the branches of the main graph's If nodes (made there, or
    main-graph values the branch reads)."""
    seen = _graph_values(model.graph, op_types)
    main_inputs = set(model.graph.inputs)
    for node in model.graph:
        if node.op_type == "If":
            for branch in _branches(node):
                for name, value in _graph_values(branch, op_types).items():
                    if _made_inside(value, branch) or value in main_inputs or _made_inside(value, model.graph):
                        seen.setdefault(name, value)
    return list(seen.values())


def _expose_branch_values(model: ir.Model, op_types: set[str]) -> dict[str, str]:
    """Make values inside If branches observable: each branch returns them as extra outputs (an empty tensor
    stands in for a value of the other branch), the If node gets matching outputs, and the graph returns those.
    Returns {graph output name: inner value name}."""
    exposed: dict[str, str] = {}
    for node in list(model.graph):
        if node.op_type != "If":
            continue
        branches = _branches(node)
        inner = [{n: v for n, v in _graph_values(b, op_types).items() if _made_inside(v, b)} for b in branches]
        names = list(dict.fromkeys(n for values in inner for n in values))
        if not names:
            continue
        for branch, values in zip(branches, inner):
            for name in names:
                if name in values:
                    branch.outputs.append(values[name])
                else:
                    empty = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(
                        np.zeros((0,), np.float32)))], name=f"{name}_absent_{id(branch)}", num_outputs=1)
                    empty.outputs[0].name = f"{name}_absent_{id(branch)}"
                    branch.append(empty)
                    branch.outputs.append(empty.outputs[0])
        wider = ir.Node(node.domain, "If", node.inputs, attributes=list(node.attributes.values()), name=node.name,
                        num_outputs=len(node.outputs) + len(names))
        for old, new in zip(node.outputs, wider.outputs):
            new.name, new.dtype, new.shape = old.name, old.dtype, old.shape
        model.graph.insert_after(node, wider)
        for old, new in zip(node.outputs, wider.outputs):
            old_name = old.name
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name, new.name = f"{old_name}_replaced", old_name
        model.graph.remove(node, safe=True)
        for name, value in zip(names, wider.outputs[len(node.outputs):]):
            value.name = f"{name}_observed"
            value.dtype = ir.DataType.FLOAT
            model.graph.outputs.append(value)
            exposed[value.name] = name
    return exposed


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
        from edgeq.runtimes.onnxruntime import run_exposing

        augmented = model.clone()
        exposed = _expose_branch_values(augmented, self.op_types)
        proto = to_proto(augmented)
        del augmented
        inner = set(exposed.values())
        fetch = [n for n in names if n not in inner] + list(exposed)
        observers = {name: make_observer(self.method, self.percentile) for name in names}
        total = len(self.data)
        feeds = (feed.inputs for feed in self.data)
        for i, outputs in enumerate(run_exposing(proto, fetch, feeds, self.threads)):
            for name, value in zip(fetch, outputs):
                observers[exposed.get(name, name)].update(value)
            if self.on_progress:
                self.on_progress(i + 1, total)
        return {name: tuple(float(v) for v in obs.range()) for name, obs in observers.items()}
