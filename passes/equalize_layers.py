"""Equalize the weight ranges of consecutive convolutions channel by channel (cross-layer equalization).

Scaling output channel i of a layer by 1/s_i and the next layer's input channel i by s_i leaves the float
function unchanged when the activation between them commutes with positive scaling. Choosing
s_i = √(r1_i / r2_i), where r1_i is the largest |weight| of the first layer's output channel i and r2_i that of
the second layers' input channel i, makes both ranges √(r1_i · r2_i): no channel is left with a few int8
levels because a neighbour's range set the scale (Nagel et al. 2019, DFQ; AIMET's CLE). A depthwise layer,
whose channels each have their own range, gains most.

Rules:
- A chain is a Conv P (grouped and depthwise included) with a constant, unshared weight (and bias), whose
  output feeds only one activation A — Relu, LeakyRelu, or PRelu with a scalar or per-channel [C, 1, 1] slope
  (each commutes with positive scaling) — or feeds the next layers directly; and every reader of A's output
  (or of P's) is a Conv C that reads it as its input with a constant, unshared weight. Neither value is a graph
  output. A Clip (ReLU6) between them ends no chain: its bounds do not commute with per-channel scaling, and
  equalizing through it would change the function (DFQ replaces ReLU6 with ReLU; edgeq does not change a
  model's function).
- s_i = √(r1_i / r2_i) with r2_i the largest over every reader; a channel with a zero range keeps s_i = 1, and
  s_i is clipped to [1/``MAX_SCALE``, ``MAX_SCALE``] so that a near-dead channel is not blown up.
- A layer can end one chain and start the next; all chains are equalized in turn, ``SWEEPS`` times at most,
  and stop early once no scale moves by more than ``TOLERANCE``.
- Layers with weights that are not finite are left alone. Every chain's layers and its range spread
  (largest / smallest channel range of P) before and after are reported (:attr:`EqualizeLayersPass.chains`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
MAX_SCALE = 1e3
SWEEPS = 20
TOLERANCE = 1e-3


def _constant_weight(node: ir.Node) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return (weight is not None and weight.const_value is not None and len(list(weight.uses())) == 1
            and weight.const_value.dtype == ir.DataType.FLOAT and np.isfinite(weight.const_value.numpy()).all())


def _sole_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


@dataclass
class Chain:
    first: ir.Node
    readers: list[ir.Node]
    prelu_slope: ir.Value | None = None  # unchanged by the scaling; kept to check it is scalar or per channel

    @property
    def name(self) -> str:
        return f"{self.first.name}→{'+'.join(r.name for r in self.readers)}"


def _chain(node: ir.Node) -> Chain | str:
    """The chain starting at Conv ``node``, or why there is none."""
    if node.op_type != "Conv" or not _constant_weight(node):
        return "not a Conv with a constant, unshared float weight"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and (bias.const_value is None or len(list(bias.uses())) > 1):
        return "bias not a constant of its own"
    value, slope = node.outputs[0], None
    activation = _sole_reader(value)
    if activation is not None and activation.op_type in HOMOGENEOUS:
        if activation.op_type == "PRelu":
            slope = activation.inputs[1]
            if slope is None or slope.const_value is None:
                return "PRelu slope is not constant"
        value = activation.outputs[0]
    elif activation is not None and activation.op_type == "Clip":
        return "Clip (ReLU6) between the layers: its bounds do not commute with channel scaling"
    if value.is_graph_output():
        return "output is a graph output"
    readers = [(user, index) for user, index in value.uses()]
    if not readers or any(u.op_type != "Conv" or i != 0 or not _constant_weight(u) for u, i in readers):
        return "read by something other than Convs with constant, unshared weights"
    return Chain(node, [u for u, _ in readers], slope)


def _by_group(reader: ir.Node) -> np.ndarray:
    """A (grouped) Conv's weight [O, I/g, k…] as [g, O/g, I/g, k…]: input channel c is [c // (I/g), :, c % (I/g)]."""
    weight = reader.inputs[1].const_value.numpy()
    groups = reader.attributes.get_int("group", 1)
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def _reader_ranges(reader: ir.Node) -> np.ndarray:
    """Largest |weight| per input channel of a (grouped) Conv."""
    grouped = np.abs(_by_group(reader))
    return grouped.max(axis=(1, *range(3, grouped.ndim))).reshape(-1).astype(np.float64)


def _scale_reader(reader: ir.Node, s: np.ndarray) -> None:
    grouped = _by_group(reader)
    factor = s.reshape(grouped.shape[0], 1, grouped.shape[2], *(1,) * (grouped.ndim - 3))
    value = reader.inputs[1]
    scaled = (grouped * factor).astype(grouped.dtype).reshape(value.const_value.shape.numpy())
    value.const_value = ir.tensor(scaled, name=value.name)


def _scale_first(node: ir.Node, s: np.ndarray) -> None:
    for index in (1, 2):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            continue
        array = value.const_value.numpy()
        shape = (-1,) + (1,) * (array.ndim - 1)
        value.const_value = ir.tensor((array / s.reshape(shape)).astype(array.dtype), name=value.name)


def _spread(ranges: np.ndarray) -> float:
    live = ranges[ranges > 0]
    return float(live.max() / live.min()) if live.size else 1.0


class EqualizeLayersPass(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.chains: dict[str, dict] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chains = [c for c in map(_chain, model.graph) if isinstance(c, Chain) and self._fits(c)]
        before = {c.name: _spread(self._first_ranges(c)) for c in chains}
        for _ in range(SWEEPS):
            moved = max((self._equalize(c) for c in chains), default=0.0)
            if moved < TOLERANCE:
                break
        for c in chains:
            self.chains[c.name] = {"first": c.first.name, "readers": [r.name for r in c.readers],
                                   "spread_before": before[c.name], "spread_after": _spread(self._first_ranges(c))}
        return ir.passes.PassResult(model, modified=bool(chains))

    @staticmethod
    def _first_ranges(chain: Chain) -> np.ndarray:
        weight = chain.first.inputs[1].const_value.numpy()
        return np.abs(weight).reshape(weight.shape[0], -1).max(axis=1).astype(np.float64)

    @staticmethod
    def _fits(chain: Chain) -> bool:
        """Readers see exactly the first layer's channels; a PRelu slope is scalar or per channel."""
        channels = chain.first.inputs[1].const_value.shape[0]
        for reader in chain.readers:
            weight = reader.inputs[1].const_value
            if weight.shape[1] * reader.attributes.get_int("group", 1) != channels:
                return False
        if chain.prelu_slope is not None:
            size = int(np.prod(chain.prelu_slope.const_value.shape.numpy()))
            return size in (1, channels)
        return True

    def _equalize(self, chain: Chain) -> float:
        """Scale one chain; returns the largest |log s| applied."""
        r1 = self._first_ranges(chain)
        r2 = np.max([_reader_ranges(r) for r in chain.readers], axis=0)
        live = (r1 > 0) & (r2 > 0)
        s = np.ones_like(r1)
        s[live] = np.clip(np.sqrt(r1[live] / r2[live]), 1 / MAX_SCALE, MAX_SCALE)
        _scale_first(chain.first, s)
        for reader in chain.readers:
            _scale_reader(reader, s)
        return float(np.abs(np.log(s)).max()) if s.size else 0.0
