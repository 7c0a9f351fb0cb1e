"""The post-training quantization techniques of a compile: layer input statistics once, then per build
[reconstruct the weights' rounding (GPTQ)] → [correct the biases].

Rules:
- ``recipe.ptq`` names the techniques (:data:`edgeq.recipe.PTQ_TECHNIQUES`): ``gptq``
  (:mod:`edgeq.passes.round_weights`) and ``bias-correction`` (:mod:`edgeq.passes.correct_bias`).
- Statistics come from the calibration feeds run on the float model once (:mod:`edgeq.passes.layer_inputs`):
  every main-graph Conv/Gemm/MatMul with a constant, unshared weight gets its input mean; with ``gptq``, each
  ungrouped one also its Gram matrix, collected in chunks of at most ``GRAM_BYTES`` so that a large model does
  not hold every H at once (each chunk is one more run over the feeds).
- Each technique runs on every candidate build after Q/DQ insertion, so it applies exactly to the layers that
  build quantizes (a layer kept float is never touched), and solutions are shared across builds.
- :meth:`PtqStage.report` is the manifest's ``ptq`` section: techniques, seconds, and per layer what each did.
"""

from __future__ import annotations

import time

import onnx_ir as ir

from edgeq.calibration_data import CalibrationData
from edgeq.passes.correct_bias import CorrectBiasPass
from edgeq.passes.layer_inputs import LayerInputsPass
from edgeq.passes.round_weights import RoundWeightsPass
from edgeq.passes.sparsify import LAYER_OPS, Layer, layer_view

GRAM_BYTES = 1 << 30
ROWS_PER_FEED = 1024  # GPTQ fits the rounding to these rows: more than the 2:4 stage's, so it does not overfit


def _chunks(layers: list[Layer], grams: bool) -> list[list[Layer]]:
    if not grams:
        return [layers]
    chunks, size = [[]], 0
    for layer in layers:
        features = layer.rows().shape[1] if layer.groups == 1 else 0
        cost = 4 * features * features
        if chunks[-1] and size + cost > GRAM_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(layer)
        size += cost
    return chunks


class PtqStage:
    def __init__(self, techniques: tuple[str, ...], model: ir.Model, calib: CalibrationData, reporter,
                 seed: int = 0):
        self.techniques = techniques
        started = time.perf_counter()
        layers = [v for v in (layer_view(n, grouped=True) for n in model.graph if n.op_type in LAYER_OPS)
                  if isinstance(v, Layer)]
        by_name = {layer.node.name: layer for layer in layers}
        grams, means = {}, {}
        want_grams = "gptq" in techniques
        for chunk in _chunks(layers, want_grams):
            with reporter.stage(f"ptq: input statistics of {len(chunk)} layers"):
                inputs = LayerInputsPass(calib, chunk, ROWS_PER_FEED, seed, reporter.progress, grams=want_grams)
                inputs(model)
            grams |= inputs.grams
            means |= inputs.means
        self.passes: list[ir.passes.PassBase] = []
        if want_grams:
            self.passes.append(RoundWeightsPass(by_name, grams))
        if "bias-correction" in techniques:
            self.passes.append(CorrectBiasPass(by_name, means))
        self.seconds = time.perf_counter() - started

    def __call__(self, candidate: ir.Model) -> None:
        started = time.perf_counter()
        for each in self.passes:
            each(candidate)
        self.seconds += time.perf_counter() - started

    def report(self) -> dict:
        sections = {"gptq": RoundWeightsPass, "bias_correction": CorrectBiasPass}
        return {"techniques": list(self.techniques), "seconds": round(self.seconds, 3),
                **{key: p.layers for p in self.passes for key, kind in sections.items() if isinstance(p, kind)}}
