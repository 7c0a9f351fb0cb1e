"""Collect activation ranges on real data.

Rules:
- Observed tensors: the float inputs and outputs of every node whose op type the target can run in integers
  (``op_types``), graph inputs included, constants excluded — in the main graph and in every subgraph, at any
  depth (If branches, Loop and Scan bodies).
- The model runs in ONNX Runtime with those tensors added as outputs, one feed at a time; each tensor's
  observer (``edgeq.observers``) updates and the outputs are dropped. Memory does not grow with the number of
  feeds. A subgraph value reaches the outputs through its node: an If returns it as an extra output (the
  branch not taken returns an empty tensor, which observers skip); a Loop or Scan body returns it as an
  extra scan output, so its statistics cover every iteration. Each such value is copied by an ``Identity``
  first, so the calibration copy stays a valid model whatever the branch returns already. So that memory does
  not grow with the iteration count (a 500-step decoder), a body returns per iteration a summary of each value
  instead of all of it: its min, its max and an evenly strided sample of at most ``LOOP_SAMPLE`` elements.
- If ONNX Runtime refuses that copy or fails running it (a scan output whose shape changes between
  iterations, say), calibration falls back to fewer subgraphs — first none under Loop/Scan, then the main
  graph only — and :attr:`CalibratePass.subgraphs` says what was observed and why not more.
- Non-finite values, and a mask's stand-ins for infinity (|x| ≥ 1e30: :data:`edgeq.observers.SENTINEL`),
  are skipped and counted per tensor (:attr:`CalibratePass.nonfinite`); a tensor with no finite value gets no
  range, and so stays float.
- Ranges are cached (:mod:`edgeq.cache`) keyed by (model hash, data hash, method, percentile, tensors,
  fallback level, the observation procedure's version, ONNX Runtime's version); a cache hit skips the run, and so
  does :meth:`CalibratePass.restore` (a locked replay gives the recorded ranges).

This is a side-effect-only pass: the model is not changed; the results are attributes of the pass.
:meth:`CalibratePass.ranges_by_method` returns every histogram method's range for chosen main-graph tensors (the
per-tensor choice of :mod:`edgeq.search.ranges`), from the histograms this pass kept when it ran with a histogram
method, else from one more run over the data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeq.cache import JsonCache
from edgeq.calibration_data import CalibrationData
from edgeq.model_io import to_proto
from edgeq.observers import HISTOGRAM_METHODS, HistogramObserver, make_observer

SUBGRAPH_OPS = ("If", "Loop", "Scan")
LOOP_SAMPLE = 1024  # elements of each value a Loop/Scan body returns per iteration for calibration
OBSERVATION_VERSION = 3  # part of the cache key: raise it when what is observed, or how, changes
# How deep calibration looks, most first: every subgraph; none under a Loop/Scan; the main graph only.
LEVELS = ("all subgraphs", "If branches outside loops", "main graph only")


def _graph_values(graph: ir.Graph, op_types: set[str]) -> list[ir.Value]:
    """Float non-constant inputs/outputs of this graph's nodes whose op type is in ``op_types``."""
    seen: dict[ir.Value, None] = {}
    for node in graph:
        if node.op_type not in op_types:
            continue
        for value in (*node.inputs, *node.outputs):
            if (value is not None and value.name and value.const_value is None
                    and value.dtype == ir.DataType.FLOAT and not value.is_initializer()):
                seen.setdefault(value)
    return list(seen)


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    if node.op_type not in SUBGRAPH_OPS or node.domain not in ("", "ai.onnx"):
        return []
    return [attr.as_graph() for attr in node.attributes.values() if attr.type == ir.AttributeType.GRAPH]


def _graphs_at(graph: ir.Graph, level: str, inside_loop: bool = False):
    """``graph`` and the subgraphs calibration looks into at ``level``."""
    yield graph
    if level == LEVELS[2]:
        return
    for node in graph:
        loop = inside_loop or node.op_type in ("Loop", "Scan")
        if loop and level == LEVELS[1]:
            continue
        for sub in _subgraphs(node):
            yield from _graphs_at(sub, level, loop)


def observed_values(model: ir.Model, op_types: set[str], level: str = LEVELS[0]) -> list[ir.Value]:
    """Values to observe at ``level``, each in the graph that owns it (makes it, or has it as an input)."""
    graphs = list(_graphs_at(model.graph, level))
    seen: dict[ir.Value, None] = {}
    for graph in graphs:
        for value in _graph_values(graph, op_types):
            if value.graph in graphs:
                seen.setdefault(value)
    return list(seen)


def _append(graph: ir.Graph, op: str, inputs: list, name: str, **attributes) -> ir.Value:
    """Append a one-output node named ``name`` (its output too) to ``graph``; returns the output."""
    node = ir.Node("", op, inputs, name=name, num_outputs=1,
                   attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()])
    node.outputs[0].name = name
    graph.append(node)
    return node.outputs[0]


def _constant(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    return _append(graph, "Constant", [], name, value=ir.tensor(array))


def _identity(graph: ir.Graph, value: ir.Value, tag: str) -> ir.Value:
    copy = _append(graph, "Identity", [value], f"{tag}_observed")
    copy.dtype = ir.DataType.FLOAT
    return copy


def _summary(graph: ir.Graph, value: ir.Value, tag: str) -> ir.Value:
    """[min, max, every k-th element] of ``value`` (k chosen so that at most LOOP_SAMPLE elements remain)."""
    ints = lambda v, name: _constant(graph, np.array([v], np.int64), f"{tag}_{name}")  # noqa: E731
    flat = _append(graph, "Reshape", [value, ints(-1, "flat_shape")], f"{tag}_flat")
    size = _append(graph, "Shape", [flat], f"{tag}_size")
    ratio = _append(graph, "Div", [size, ints(LOOP_SAMPLE, "sample")], f"{tag}_ratio")
    step = _append(graph, "Add", [ratio, ints(1, "one")], f"{tag}_step")
    sample = _append(graph, "Slice", [flat, ints(0, "start"), size, ints(0, "axis"), step], f"{tag}_strided")
    low = _append(graph, "ReduceMin", [flat], f"{tag}_min", keepdims=1)
    high = _append(graph, "ReduceMax", [flat], f"{tag}_max", keepdims=1)
    summary = _append(graph, "Concat", [low, high, sample], f"{tag}_observed", axis=0)
    summary.dtype = ir.DataType.FLOAT
    return summary


def _empty(graph: ir.Graph, tag: str) -> ir.Value:
    empty = _constant(graph, np.zeros((0,), np.float32), f"{tag}_absent")
    empty.dtype = ir.DataType.FLOAT
    return empty


def _widen(node: ir.Node, extra: int) -> ir.Node:
    """Replace ``node`` by a copy with ``extra`` more outputs (appended); the old outputs keep their names."""
    wider = ir.Node(node.domain, node.op_type, node.inputs, attributes=list(node.attributes.values()), name=node.name,
                    num_outputs=len(node.outputs) + extra)
    for old, new in zip(node.outputs, wider.outputs):
        new.name, new.dtype, new.shape = old.name, old.dtype, old.shape
    node.graph.insert_after(node, wider)
    for old, new in zip(node.outputs, wider.outputs):
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name, new.name = f"{name}_replaced", name
    node.graph.remove(node, safe=True)
    return wider


def _expose(graph: ir.Graph, wanted: set[ir.Value], counter: list[int]) -> list[tuple[ir.Value, str]]:
    """Make every wanted value owned by ``graph`` or its subgraphs a value of ``graph``: (value, observed name)."""
    found = [(v, v.name) for v in wanted if v.graph is graph]
    for node in list(graph):
        subs = _subgraphs(node)
        inner = [_expose(sub, wanted, counter) for sub in subs]
        names = list(dict.fromkeys(name for part in inner for _, name in part))
        if not names:
            continue
        counter[0] += 1
        tag = f"edgeq_calib_{counter[0]}"
        copy = _summary if node.op_type in ("Loop", "Scan") else _identity
        for sub, part in zip(subs, inner):
            by_name = dict((name, value) for value, name in part)
            for i, name in enumerate(names):
                sub.outputs.append(copy(sub, by_name[name], f"{tag}_{i}") if name in by_name
                                   else _empty(sub, f"{tag}_{i}"))
        if node.op_type == "Scan":
            for key in ("scan_output_axes", "scan_output_directions"):
                if key in node.attributes:
                    node.attributes[key] = ir.AttrInt64s(key, [*node.attributes[key].as_ints(), *[0] * len(names)])
        wider = _widen(node, len(names))
        renamed = dict(zip(node.outputs, wider.outputs))  # a wanted output of this node is now the wider one's
        found = [(renamed.get(value, value), name) for value, name in found]
        for i, (value, name) in enumerate(zip(wider.outputs[-len(names):], names)):
            value.name, value.dtype = f"{tag}_{i}_out", ir.DataType.FLOAT
            found.append((value, name))
    return found


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
        self.cache = JsonCache(cache_dir if model_digest else None)
        self.threads = threads
        self.on_progress = on_progress
        self.ranges: dict[str, tuple[float, float]] = {}
        self.nonfinite: dict[str, dict[str, int]] = {}
        self.subgraphs: dict = {}
        self.cache_hit = self.restored = False
        self._histograms: dict[str, HistogramObserver] = {}  # main-graph tensors' when it ran with a histogram method

    def _key(self, names: list[str], level: str) -> list:
        import onnxruntime

        return [OBSERVATION_VERSION, onnxruntime.__version__, self.model_digest, self.data.digest, self.method,
                self.percentile, names, level, LOOP_SAMPLE]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        has_subgraphs = any(_subgraphs(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))
        failures = []
        for level in LEVELS if has_subgraphs else LEVELS[-1:]:
            names = [v.name for v in observed_values(model, self.op_types, level)]
            cached = self.cache.get("calibration", self._key(names, level))
            if cached is not None:
                self.ranges = {k: tuple(v) for k, v in cached["ranges"].items()}
                self.nonfinite, self.cache_hit = cached["nonfinite"], True
            else:
                try:
                    self.ranges, self.nonfinite = self._observe(model, level)
                except Exception as exc:  # noqa: BLE001 — ORT refused this calibration copy: look less deep
                    if level == LEVELS[-1]:
                        raise
                    failures.append(f"{level}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                self.cache.put("calibration", self._key(names, level),
                               {"ranges": self.ranges, "nonfinite": self.nonfinite})
            self.subgraphs = {"observed": level, "fell_back_from": failures} if has_subgraphs else {}
            break
        return ir.passes.PassResult(model, modified=False)

    def restore(self, ranges: dict[str, list[float]], nonfinite: dict[str, dict[str, int]]) -> None:
        """Take the results of an earlier run (a locked replay's) instead of running."""
        self.ranges = {name: tuple(r) for name, r in ranges.items()}
        self.nonfinite, self.restored = dict(nonfinite), True

    def ranges_by_method(self, model: ir.Model, names: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
        """For main-graph tensors ``names``: the range each histogram method decides (from the kept histograms;
        the tensors without one are observed in one more run over the data)."""
        from edgeq.runtimes.onnxruntime import run_exposing

        main = {v.name for v in _graph_values(model.graph, self.op_types)} | {v.name for v in model.graph.inputs}
        wanted = [name for name in dict.fromkeys(names) if name in main]
        observers = {name: self._histograms[name] for name in wanted if name in self._histograms}
        fetch = [name for name in wanted if name not in observers]
        observers |= {name: HistogramObserver(percentile=self.percentile) for name in fetch}
        for feed_outputs in run_exposing(to_proto(model), fetch, (f.inputs for f in self.data), self.threads) \
                if fetch else ():
            for name, value in zip(fetch, feed_outputs):
                observers[name].update(value)
        return {name: {m: tuple(float(v) for v in obs.range_by(m)) for m in HISTOGRAM_METHODS}
                for name, obs in observers.items() if obs.finite}

    def _observe(self, model: ir.Model, level: str) -> tuple[dict, dict]:
        from edgeq.runtimes.onnxruntime import run_exposing

        augmented = model.clone()
        wanted = set(observed_values(augmented, self.op_types, level))
        main = [v.name for v in wanted if v.graph is augmented.graph]
        inner = {v for v in wanted if v.graph is not augmented.graph}
        exposed = _expose(augmented.graph, inner, [0])
        augmented.graph.outputs.extend(value for value, _ in exposed)
        fetch = main + [value.name for value, _ in exposed]
        origin = {value.name: name for value, name in exposed}
        proto = to_proto(augmented)
        del augmented
        observers = {origin.get(name, name): make_observer(self.method, self.percentile) for name in fetch}
        total = len(self.data)
        feeds = (feed.inputs for feed in self.data)
        for i, outputs in enumerate(run_exposing(proto, fetch, feeds, self.threads)):
            for name, value in zip(fetch, outputs):
                observers[origin.get(name, name)].update(value)
            if self.on_progress:
                self.on_progress(i + 1, total)
        ranges = {name: tuple(float(v) for v in r) for name, obs in observers.items()
                  if (r := obs.range()) is not None}
        nonfinite = {name: {"nonfinite": obs.nonfinite, "finite": obs.finite}
                     for name, obs in observers.items() if obs.nonfinite}
        return ranges, nonfinite
