"""Migrate per-channel activation outliers into the weights of the layers that read them (SmoothQuant).

A per-tensor int8 activation scale is set by the largest channel; when a few channels of a transformer's
LayerNorm output are 100× the rest, the rest round to a handful of levels. Dividing channel j by s_j and
multiplying row j of every reading weight by s_j leaves the float function unchanged and moves the range
into the weights, which are quantized per output channel (Xiao et al. 2023).

Rules:
- A site is a float value X that MatMul/Gemm layers with constant, unshared 2-D weights read as their input
  (reducing over X's last axis). Where only those layers read X and X is made by a LayerNormalization over
  the last axis, or by Add(Mul(·, γ), β) with constant [C] γ and β feeding nothing else (a LayerNorm
  decomposed by an old exporter), 1/s goes into γ and β: free. Elsewhere — a post-LN encoder's LayerNorm
  output that also feeds the residual Add (BERT), a GELU output — a new Mul by 1/s goes in front of the
  layers, and only where that halves the predicted error (``MUL_GAIN``): an elementwise op is cheap beside
  the MatMuls it serves, but not free.
- s_j = max|X_j|^α / max|W_j|^(1−α) (the weight maximum over every reading layer's row j), from the layer
  input statistics of :mod:`edgeq.passes.layer_inputs`; channels that never fire keep s_j = 1.
- α per site is chosen from ``ALPHAS`` by the smallest predicted relative output error of the reading
  layers: their int8 weight error through H' = S⁻¹HS⁻¹ plus the activation rounding noise Δ²/12 of X/s's
  per-tensor range; α = 0 (nothing moves) is a candidate, so a site is smoothed only where that predicts
  less error; a site whose values were not finite on the calibration data is left alone. Every site's α and both predictions are reported (:attr:`SmoothActivationsPass.sites`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes.insert_qdq import weight_quantize
from edgeq.passes.sparsify import Layer, layer_view
from edgeq.target import QuantizationRules

ALPHAS = (0.0, 0.25, 0.5, 0.65, 0.8)
MUL_GAIN = 0.5  # a site that needs a new Mul is smoothed only when that halves the predicted error
_LEVELS = {"uint8": 255, "int8": 255, "uint16": 65535, "int16": 65535}


def _constant(value: ir.Value | None, size: int) -> bool:
    return (value is not None and value.const_value is not None and tuple(value.const_value.shape) == (size,)
            and len(list(value.uses())) == 1)


def absorbers(value: ir.Value, channels: int) -> tuple[ir.Value, ir.Value] | None:
    """The constant γ and β whose division by s divides ``value``'s channels by s, if ``value`` has them."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "LayerNormalization":
        inputs = list(node.inputs) + [None] * 3
        if node.attributes.get_int("axis", -1) != -1:
            return None
        if _constant(inputs[1], channels) and (inputs[2] is None or _constant(inputs[2], channels)):
            return inputs[1], inputs[2]
        return None
    if node.op_type == "Add":
        for i in (0, 1):
            beta, mul = node.inputs[1 - i], node.inputs[i].producer()
            if not _constant(beta, channels) or mul is None or mul.op_type != "Mul":
                continue
            if len(list(node.inputs[i].uses())) != 1:
                continue
            for gamma in mul.inputs:
                if _constant(gamma, channels):
                    return gamma, beta
    return None


def _sites(model: ir.Model) -> dict[ir.Value, list[Layer]]:
    """Each float value that MatMul/Gemm layers read as their input → those layers (same channel count)."""
    found: dict[ir.Value, list[Layer]] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.inputs[0] is None or node.inputs[0] in found:
            continue
        value = node.inputs[0]
        layers = [layer_view(n) for n, i in value.uses() if i == 0 and n.op_type in ("MatMul", "Gemm")]
        layers = [layer for layer in layers if not isinstance(layer, str)]
        if layers and value.dtype == ir.DataType.FLOAT and len({layer.in_channels for layer in layers}) == 1:
            found[value] = layers
    return found


def _only_layers_read(value: ir.Value, layers: list[Layer]) -> bool:
    return len(list(value.uses())) == len(layers) and not value.is_graph_output()


class SmoothActivationsPass(ir.passes.InPlacePass):
    def __init__(self, rules: QuantizationRules, grams: dict[str, np.ndarray],
                 ranges: dict[str, tuple[np.ndarray, np.ndarray]], rows: dict[str, int]):
        super().__init__()
        self.rules, self.grams, self.ranges, self.rows = rules, grams, ranges, rows
        self.sites: dict[str, dict] = {}

    @staticmethod
    def layers(model: ir.Model) -> list[Layer]:
        """The layers whose input statistics the pass needs."""
        return [layer for layers in _sites(model).values() for layer in layers]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value, layers in _sites(model).items():
            first = layers[0].node.name
            if first not in self.grams:
                continue
            low, high = self.ranges[first]
            if not (np.isfinite(low).all() and np.isfinite(high).all() and np.isfinite(self.grams[first]).all()):
                continue
            act = np.maximum(np.abs(low), np.abs(high)).astype(np.float64)
            weight = np.max([np.abs(layer.rows()).max(axis=0) for layer in layers], axis=0).astype(np.float64)
            statistics = [(layer, self.grams[layer.node.name].astype(np.float64), layer.rows().astype(np.float64))
                          for layer in layers]
            errors = {alpha: self._predicted(statistics, self._scales(act, weight, alpha), low, high)
                      for alpha in ALPHAS}
            alpha = min(errors, key=errors.get)
            absorbing = absorbers(value, len(act)) if _only_layers_read(value, layers) else None
            if absorbing is None and errors[alpha] > MUL_GAIN * errors[0.0]:
                alpha = 0.0  # a new Mul would not pay for itself
            self.sites[value.name] = {"layers": [layer.node.name for layer in layers], "alpha": alpha,
                                      "error_unsmoothed": errors[0.0], "error": errors[alpha]}
            if alpha == 0.0:
                continue
            scales = self._scales(act, weight, alpha)
            if absorbing is not None:
                for absorber in (a for a in absorbing if a is not None):
                    stored = absorber.const_value.numpy()
                    absorber.const_value = ir.tensor((stored / scales).astype(stored.dtype), name=absorber.name)
            else:
                self._divide_before(model.graph, value, layers, scales)
            self.sites[value.name]["into"] = "LayerNorm" if absorbing is not None else "Mul"
            for layer in layers:
                rows = layer.rows() * scales[None, :]
                layer.weight.const_value = ir.tensor(layer.from_rows(rows).astype(layer.array.dtype),
                                                     name=layer.weight.name)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _divide_before(graph: ir.Graph, value: ir.Value, layers: list[Layer], scales: np.ndarray) -> None:
        """A new Mul by 1/s between ``value`` and the layers (its other readers keep ``value``)."""
        name = f"{value.name}_smoothing"
        inverse = ir.Value(name=f"{name}_inverse", const_value=ir.tensor((1.0 / scales).astype(np.float32),
                                                                         name=f"{name}_inverse"))
        graph.register_initializer(inverse)
        mul = ir.Node("", "Mul", [value, inverse], name=name, num_outputs=1)
        mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = f"{value.name}_smoothed", value.dtype, value.shape
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, mul)
        else:
            graph.insert_before(graph[0], mul)
        for layer in layers:
            layer.node.replace_input_with(0, mul.outputs[0])

    @staticmethod
    def _scales(act: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
        if alpha == 0.0:
            return np.ones_like(act)
        alive = (act > 0) & (weight > 0)
        scales = np.ones_like(act)
        scales[alive] = np.clip(act[alive] ** alpha / weight[alive] ** (1 - alpha), 1e-5, 1e5)
        return scales

    def _predicted(self, statistics: list[tuple[Layer, np.ndarray, np.ndarray]], scales: np.ndarray,
                   low: np.ndarray, high: np.ndarray) -> float:
        """Σ over the layers (each with its H and weight rows) of (weight error + activation noise) / signal,
        on the calibration rows, with channel j divided by ``scales[j]``."""
        rules = self.rules
        smoothed_low, smoothed_high = min(0.0, float(np.min(low / scales))), max(0.0, float(np.max(high / scales)))
        step = (smoothed_high - smoothed_low) / _LEVELS[rules.activations]
        total = 0.0
        for layer, gram, rows in statistics:
            smoothed = rows * scales[None, :]
            q, scale = weight_quantize(smoothed, 0 if rules.per_channel else None, rules.reduce_range)
            delta = smoothed - q * (scale[:, None] if scale.ndim else scale)
            h = gram / np.outer(scales, scales)
            noise = float(np.sum((delta @ h) * delta)) + self.rows[layer.node.name] * step * step / 12 * float(np.sum(smoothed ** 2))
            signal = float(np.sum((rows @ gram) * rows))
            total += noise / signal if signal > 0 else 0.0
        return total
