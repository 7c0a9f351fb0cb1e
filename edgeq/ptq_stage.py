"""The post-training quantization techniques of a compile, around calibration:
[equalize consecutive layers (CLE)] → [smooth activation outliers (SmoothQuant)] → calibrate → layer input
statistics once → per build [reconstruct the weights' rounding (GPTQ)] → [correct the biases].

Rules:
- ``recipe.ptq`` names the techniques (:data:`edgeq.recipe.PTQ_TECHNIQUES`), or is ``auto``: none up front,
  and :data:`edgeq.recipe.PTQ_ON_GUARD_MISS` built and measured by the fidelity guard when uniform int8 misses
  it, on the layers of the groups its sensitivity table ranks worst (the pipeline keeps them when they do no
  worse). The techniques: ``cle``
  (:mod:`edgeq.passes.equalize_layers`) and ``smoothquant`` (:mod:`edgeq.passes.smooth_activations`), float
  rewrites that leave the function unchanged, so they run before calibration; ``gptq`` (:mod:`edgeq.passes.round_weights`) and ``bias-correction``
  (:mod:`edgeq.passes.correct_bias`).
- Statistics come from the calibration feeds run on the float model (:mod:`edgeq.passes.layer_inputs`):
  every main-graph Conv/Gemm/MatMul with a constant, unshared weight (of those the guard names, under
  ``auto``) gets its input mean; with ``gptq``, each
  ungrouped one also its Gram matrix, collected in chunks of at most ``GRAM_BYTES`` so that a large model does
  not hold every H at once (each chunk is one more run over the feeds).
- GPTQ and bias correction run on every candidate build after Q/DQ insertion, so they apply exactly to the
  layers that build quantizes (a layer kept float is never touched), and solutions are shared across builds.
- :meth:`PtqStage.report` is the manifest's ``ptq`` section: techniques, seconds, and per site or layer what
  each did.
"""

from __future__ import annotations

import time

import onnx_ir as ir

from edgeq.calibration_data import CalibrationData
from edgeq.passes.correct_bias import CorrectBiasPass
from edgeq.passes.equalize_layers import EqualizeLayersPass
from edgeq.passes.layer_inputs import LayerInputsPass
from edgeq.passes.round_weights import RoundWeightsPass
from edgeq.passes.smooth_activations import SmoothActivationsPass
from edgeq.passes.sparsify import LAYER_OPS, Layer, layer_view
from edgeq.target import QuantizationRules

GRAM_BYTES = 1 << 30
ROWS_PER_FEED = 1024  # the rows H sums per feed: more than the 2:4 stage's, so GPTQ does not overfit them


def _chunks(layers: list[Layer], grams: bool) -> list[list[Layer]]:
    if not grams:
        return [layers]
    chunks, size = [[]], 0
    for layer in layers:
        features = layer.array.size // layer.out_channels if layer.groups == 1 else 0
        cost = 4 * features * features
        if chunks[-1] and size + cost > GRAM_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(layer)
        size += cost
    return chunks


class PtqStage:
    def __init__(self, techniques: tuple[str, ...], reporter, seed: int = 0, from_lock: bool = False):
        """``from_lock``: a locked replay whose lock holds the weights GPTQ and bias correction made
        (:mod:`edgeq.lock`, rule 4); they replace every initializer, so those two compute nothing."""
        self.auto = techniques == ("auto",)
        self.techniques = () if self.auto else techniques
        self.reporter, self.seed, self.from_lock = reporter, seed, from_lock
        self.on_guard_miss: dict | None = None  # with auto: what trying PTQ_ON_GUARD_MISS measured
        self.passes: list[ir.passes.PassBase] = []
        self.smoothed: dict[str, dict] | None = None
        self.equalized: dict[str, dict] | None = None
        self.function_check: dict | None = None  # the float rewrites checked against the model in ONNX Runtime
        self.seconds = 0.0

    def _statistics(self, model: ir.Model, calib: CalibrationData, layers: list[Layer], grams: bool) -> dict:
        """LayerInputsPass's results (grams, means, ranges, rows: each layer name → figure), chunk by chunk."""
        merged = {field: {} for field in ("grams", "means", "ranges", "rows")}
        for chunk in _chunks(layers, grams):
            with self.reporter.stage(f"ptq: input statistics of {len(chunk)} layers"):
                inputs = LayerInputsPass(calib, chunk, ROWS_PER_FEED, self.seed, self.reporter.progress, grams=grams)
                inputs(model)
            for field, figures in merged.items():
                figures.update(getattr(inputs, field))
        return merged

    @property
    def rewrites_before_calibration(self) -> bool:
        return any(t in self.techniques for t in ("cle", "smoothquant"))

    def before_calibration(self, model: ir.Model, calib: CalibrationData, rules: QuantizationRules) -> bool:
        """Cross-layer equalization and SmoothQuant, when asked; True when the model changed."""
        started, changed = time.perf_counter(), False
        if "cle" in self.techniques:
            equalize = EqualizeLayersPass()
            changed = equalize(model).modified
            self.equalized = equalize.chains
        if "smoothquant" in self.techniques:
            stats = self._statistics(model, calib, SmoothActivationsPass.layers(model), grams=True)
            smooth = SmoothActivationsPass(rules, stats["grams"], stats["ranges"], stats["rows"])
            changed |= smooth(model).modified
            self.smoothed = smooth.sites
        self.seconds += time.perf_counter() - started
        return changed

    def after_calibration(self, model: ir.Model, calib: CalibrationData, techniques: tuple[str, ...] = (),
                          only: set[str] | None = None) -> None:
        """Input statistics for GPTQ and bias correction, when asked (or named in ``techniques``: the guard's
        try under ``auto``, for the layers named in ``only``); none for a replay that took the lock's weights."""
        if techniques:
            self.techniques = techniques
        if self.from_lock:
            return
        want_grams, want_bias = "gptq" in self.techniques, "bias-correction" in self.techniques
        if not (want_grams or want_bias):
            return
        started = time.perf_counter()
        layers = [v for v in (layer_view(n, grouped=True) for n in model.graph
                              if n.op_type in LAYER_OPS and (only is None or n.name in only)) if isinstance(v, Layer)]
        by_name = {layer.node.name: layer for layer in layers}
        stats = self._statistics(model, calib, layers, want_grams)
        if want_grams:
            self.passes.append(RoundWeightsPass(by_name, stats["grams"]))
        if want_bias:
            self.passes.append(CorrectBiasPass(by_name, stats["means"]))
        self.seconds += time.perf_counter() - started

    def drop(self) -> None:
        """Stop applying the techniques (they measured no better)."""
        self.passes, self.techniques = [], ()

    def __call__(self, candidate: ir.Model) -> None:
        started = time.perf_counter()
        for each in self.passes:
            each(candidate)
        self.seconds += time.perf_counter() - started

    def report(self) -> dict:
        sections = {"gptq": RoundWeightsPass, "bias_correction": CorrectBiasPass}
        report = {"techniques": list(self.techniques), "seconds": round(self.seconds, 3)} | (
            {"weights_from_lock": True} if self.from_lock else {})
        if self.auto:
            report["auto"] = self.on_guard_miss or {"tried": False, "why": "uniform int8 held the guard, or no guard"}
        if self.function_check is not None:
            report["function_check"] = self.function_check
        if self.equalized is not None:
            report["cle"] = self.equalized
        if self.smoothed is not None:
            report["smoothquant"] = self.smoothed
        return report | {key: p.layers for p in self.passes for key, kind in sections.items() if isinstance(p, kind)}
