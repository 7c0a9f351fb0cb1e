"""Sensitivity: what each group at each precision costs in output fidelity, measured forward-only.

Rules:
- One group at a time takes a lower precision while every other layer stays float; the model runs on the
  first calibration feeds and the group's sensitivity at that precision is the output noise-to-signal ratio
  NSR = Σ error² / Σ reference² of the worst float output (SQNR = −10·log10 NSR). An output whose length
  depends on values (a detector's boxes after its NMS) is compared order-free, each column of its items (class,
  score, coordinates) as an output of its own: matched items by their difference, unmatched ones whole
  (:func:`edgeq.detections.matched_nsr`) — elementwise, any group that swapped two boxes of close score looked
  as harmful as one that lost them.
- The feeds are as many of those given as fit RUN_SECONDS of inference over all the trials together, timed
  warm on the float model (and on the gated model for its trials), but at least MIN_FEEDS: a ranking needs
  few feeds, and a slow model (a 0.4 s table decoder with 77 groups) would otherwise spend minutes of its
  compile here. Fewer than MIN_FEEDS misranks: a speech-quality CNN ranked on 2 feeds returned a middle
  convolution to float instead of its first and the guard's build was slower than float; an 82-group
  EfficientNet-style CNN returns the same 65 groups to float ranked on 4 feeds as on 8, in half the time.
- Noise from independent sources adds, so a configuration's NSR is predicted as the sum of its groups' NSRs
  (the additivity HAWQ and ZeroQ assume too); the search checks every prediction it acts on by measurement.
- Proxy (``--sensitivity proxy``; ``auto`` uses it for large models): for a one-layer group whose weight
  :func:`edgeq.passes.sparsify.layer_view` can read as rows W (Conv without groups, Gemm, MatMul), the layer's
  own NSR is computed from its input Gram matrix H on the same feeds — weight error tr(ΔW H ΔWᵀ) plus, for
  int8 and int16, the input and output rounding noise (n·s²/12 per element, s from the calibrated ranges) —
  over the signal tr(W H Wᵀ). Weight quantization error × activation scale, no build per group. Three proxied groups
  are also measured, and the geometric mean of measured / proxy scales every proxy to output NSR; other
  groups (depthwise convolutions, shared weights, attention MatMuls, layers inside If/Loop bodies, whose
  inputs cannot be graph outputs) are measured. One scale cannot say how
  much of each layer's noise reaches the output (a residual stream dilutes late layers' noise), so proxies
  are rougher than measurements; the search's measured builds correct the overall scale.
- Gated (the default for int8 where the model allows it): one model holds every int8 site of the uniform build,
  each switchable at run time (:mod:`edgeq.passes.gate_qdq`), and a group's int8 trial switches on the sites
  its one-group build would quantize (:meth:`InsertQDQPass.planned`) — one build and one session instead of
  one per group. Its arithmetic is float on the quantized values (fake quantization), which ranks groups as
  the integer kernels would; the guard and the search check every configuration they act on by a real
  build. Other precisions, groups in subgraphs and dynamic-int8 layers are built one at a time.
- The table is cached beside the calibration ranges, keyed by the caller (model, data, ranges, op set, rules).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeq.mixed.groups import Group
from edgeq.passes.insert_qdq import WIDE, activation_qparams, int4_blockwise, weight_channel_axis, weight_quantize
from edgeq.cache import JsonCache
from edgeq.detections import DetectionHead, holds_items, matched_nsr, set_outputs
from edgeq.passes.gate_qdq import GATES
from edgeq.passes.layer_inputs import LayerInputsPass
from edgeq.passes.sparsify import Layer, layer_view
from edgeq.target import Target

CALIBRATION_GROUPS = 3
RUN_SECONDS = 6.0  # inference the trials may spend on feeds, all together (but MIN_FEEDS feeds at least)
MIN_FEEDS = 4


@dataclass
class GatedModel:
    """A model whose quantization sites switch on by a gates input (:mod:`edgeq.passes.gate_qdq`), and for each
    group it serves, the gates of that group's one-group int8 build."""

    path: Path
    gates: dict[str, np.ndarray]  # group → bool vector for GATES

    def feeds(self, group: Group, feeds: list) -> list[dict]:
        """``feeds`` with the gates of a group it serves added."""
        return [dict(feed.inputs) | {GATES: self.gates[group.name]} for feed in feeds]


@dataclass
class Sensitivity:
    nsr: dict[str, dict[str, float]]  # group → precision → output NSR (float: 0)
    feeds: int
    seconds: float = 0.0
    cache_hit: bool = False
    proxy_groups: list[str] | None = None  # groups whose figures are scaled proxies
    proxy_scale: float | None = None
    gated_trials: int = 0  # trials run on the gated model instead of a build each

    def to_dict(self) -> dict:
        return asdict(self)


def _error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Σ error² of one output; where the candidate's length differs (a decoder that stopped at another step)
    both are zero-padded to the longer, the part only one has counting whole; another rank is all error."""
    if reference.shape != candidate.shape:
        if reference.ndim != candidate.ndim:
            return np.inf
        shape = np.maximum(reference.shape, candidate.shape)
        reference, candidate = (np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)])
                                for a in (reference, candidate))
    return float(np.square(reference.astype(np.float64) - candidate).sum())


def output_nsr(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]],
               sets: Mapping[int, DetectionHead | None] | None = None) -> float:
    """Worst NSR over the float outputs, each summed over all feeds (outputs listed per feed); the outputs at
    ``sets`` vary in length with values (a detector's after its NMS), or are a raw detector head whose
    detections are decoded: their error is order-free (:func:`edgeq.detections.matched_nsr`)."""
    worst, sets = 0.0, sets or {}
    for index in range(len(reference[0])):
        if not np.issubdtype(reference[0][index].dtype, np.floating):
            continue
        if index in sets:
            worst = max(worst, matched_nsr([r[index] for r in reference], [c[index] for c in candidate],
                                           sets[index]))
            continue
        signal = sum(float(np.square(r[index], dtype=np.float64).sum()) for r in reference)
        noise = sum(_error(r[index], c[index]) for r, c in zip(reference, candidate))
        worst = max(worst, noise / signal if signal > 0 else (0.0 if noise == 0 else np.inf))
    return worst


def measure_sensitivity(groups: list[Group], build: Callable[[dict[str, str]], Path], runtime, float_path: Path,
                        feeds: list, cache: tuple[JsonCache, list] | None = None,
                        on_progress: Callable[[int, int], None] | None = None,
                        proxy: dict[str, dict[str, float]] | None = None,
                        gated: GatedModel | None = None) -> Sensitivity:
    """``build(precisions)`` writes a model with those node precisions into a folder of its own, which is
    removed once measured. ``feeds`` are calibration feeds (the first of them are used, see the rules);
    ``proxy`` (from :func:`proxy_nsr`) stands in for the groups it names, scaled by the calibration groups
    measured too; ``gated`` runs the int8 trials of the groups it serves. ``cache``: a cache and the key of
    this table in it."""
    cached = cached_sensitivity(cache, groups)
    if cached is not None:
        return cached
    started = time.perf_counter()
    proxy = proxy or {}
    reference_session = runtime.session(float_path)
    reference, seconds = [], []
    for feed in feeds:
        begun = time.perf_counter()
        reference.append(reference_session.run(feed.inputs))
        seconds.append(time.perf_counter() - begun)  # the first run is cold: the median is warm
    item_sets = set_outputs(float_path)
    sets = {i: None for i, name in enumerate(reference_session.output_names)
            if name in item_sets and holds_items(item_sets[name], reference[0][i])}
    sets |= {i: head for i, array in enumerate(reference[0]) if i not in sets
             for head in [DetectionHead.of(array)] if head is not None}
    all_float = {node: "float" for g in groups for node in g.nodes}
    proxied = [g for g in groups if g.name in proxy]
    checks = [proxied[int(i)] for i in np.unique(np.linspace(0, len(proxied) - 1, CALIBRATION_GROUPS).round())] \
        if proxied else []
    trials = [(g, p) for g in groups for p in g.precisions if p != "float" and (g.name not in proxy or g in checks)]
    on_gates = [g for g, p in trials if gated is not None and p == "int8" and g.name in gated.gates]
    per_feed = float(np.median(seconds)) * (len(trials) - len(on_gates))
    if on_gates:
        gated_session = runtime.session(gated.path, optimized=False)
        first = gated.feeds(on_gates[0], feeds[:1])[0]
        gated_session.run(first)  # cold: allocations
        begun = time.perf_counter()
        gated_session.run(first)
        per_feed += (time.perf_counter() - begun) * len(on_gates)
    affordable = int(RUN_SECONDS / max(per_feed, 1e-9)) if trials else len(feeds)
    feeds = feeds[:min(len(feeds), max(MIN_FEEDS, affordable))]
    reference = reference[:len(feeds)]
    nsr: dict[str, dict[str, float]] = {g.name: {"float": 0.0} for g in groups}
    for done, (group, precision) in enumerate(trials, start=1):
        if precision == "int8" and group in on_gates:
            outputs = [gated_session.run(feed) for feed in gated.feeds(group, feeds)]
        else:
            path = build(all_float | {node: precision for node in group.nodes})
            session = runtime.session(path)
            outputs = [session.run(feed.inputs) for feed in feeds]
            del session
            shutil.rmtree(path.parent)
        nsr[group.name][precision] = output_nsr(reference, outputs, sets)
        if on_progress:
            on_progress(done, len(trials))
    scale = None
    if proxied:
        ratios = [nsr[g.name][p] / proxy[g.name][p] for g in checks for p in g.precisions
                  if p != "float" and proxy[g.name][p] > 0 and nsr[g.name][p] > 0]
        scale = float(np.exp(np.mean(np.log(ratios)))) if ratios else 1.0
        for g in proxied:
            if g not in checks:
                nsr[g.name] |= {p: v * scale for p, v in proxy[g.name].items()}
    result = Sensitivity(nsr, len(feeds), time.perf_counter() - started, False,
                         [g.name for g in proxied if g not in checks] or None, scale, len(on_gates))
    if cache is not None:
        cache[0].put("sensitivity", _key(cache, groups), {k: v for k, v in result.to_dict().items() if k != "cache_hit"})
    return result


def _key(cache: tuple[JsonCache, list], groups: list[Group]) -> list:
    """The caller's key, and the groups the table is of."""
    return [*cache[1], [[g.name, list(g.nodes), list(g.precisions)] for g in groups]]


def cached_sensitivity(cache: tuple[JsonCache, list] | None, groups: list[Group]) -> Sensitivity | None:
    payload = cache[0].get("sensitivity", _key(cache, groups)) if cache is not None else None
    return None if payload is None else Sensitivity(**payload, cache_hit=True)


def proxy_nsr(model: ir.Model, groups: list[Group], feeds: list, ranges: dict, target: Target) -> dict:
    """Layer-level NSR per precision for the one-layer groups whose weight reads as rows; see the rules."""
    layers, nodes = {}, {n.name: n for n in model.graph}
    for group in groups:
        node = nodes.get(group.nodes[0]) if len(group.nodes) == 1 else None  # None: in a subgraph
        layer = layer_view(node) if node is not None else "not one layer"
        if isinstance(layer, Layer):
            layers[group.name] = (group, layer)
    if not layers:
        return {}
    inputs = LayerInputsPass(feeds, [layer for _, layer in layers.values()])
    inputs(model)
    return {name: {p: _layer_nsr(layer, inputs.grams[layer.node.name], inputs.rows[layer.node.name], p, ranges,
                                 target) for p in group.precisions if p != "float"}
            for name, (group, layer) in layers.items()}


def _layer_nsr(layer: Layer, gram: np.ndarray, rows: int, precision: str, ranges: dict, target: Target) -> float:
    w = layer.rows().astype(np.float64)
    signal = float(np.sum((w @ gram) * w))
    array = layer.array.astype(np.float32)
    rules = target.quantization
    noise = 0.0
    if precision == "int4":
        q, scale, zero = int4_blockwise(array, target.precisions.int4_block_size)
        block = target.precisions.int4_block_size
        back = ((q.reshape(-1, block, q.shape[1]).astype(np.float32) - zero[:, None, :]) * scale[:, None, :])
        delta = layer.rows(array - back.reshape(array.shape)).astype(np.float64)
    else:
        axis = weight_channel_axis(layer.node, array.ndim) if rules.per_channel else None
        q, scale = weight_quantize(array, axis, rules.reduce_range)
        shape = [1] * array.ndim
        if axis is not None:
            shape[axis] = -1
        delta = layer.rows(array - q.astype(np.float32) * scale.reshape(shape)).astype(np.float64)
        for value, per_row in ((layer.node.inputs[0], float(np.sum(w * w))), (layer.node.outputs[0], w.shape[0])):
            if value.name in ranges:
                dtype = WIDE[rules.activations] if precision == "int16" else rules.activations
                step = activation_qparams(*ranges[value.name], dtype, rules.symmetric_activations).scale
                noise += rows * per_row * step * step / 12.0
    noise += float(np.sum((delta @ gram) * delta))
    return noise / signal if signal > 0 else 0.0
