"""The 2:4 stage of a compile: [permute channels] → layer input statistics → prune → keep the budget.

Rules:
- Only a target with 2:4 kernels (a ``[sparsity]`` section listing ``2:4``) can be asked for 2:4; layers are
  judged by its rules (:mod:`edgeq.passes.sparsify`).
- Every eligible layer is pruned, unless ``--max-drop`` is given and the sparse float model's accuracy drop
  on the held-out feeds exceeds ``BUDGET_SHARE`` of it (the rest is left for int8). Then each layer's
  sensitivity is measured alone (the worst output SQNR with only that layer pruned), layers are ordered from
  least to most sensitive, and the longest prefix whose combined drop fits is found by bisection; the others
  stay dense. Every measurement is recorded.
- The result is deterministic: sensitivity is measured fidelity, not latency.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx_ir as ir

from edgeq.artifact import MODEL
from edgeq.calibration_data import CalibrationData
from edgeq.errors import UserError
from edgeq.fidelity import accuracy_drop, compare_models, worst_sqnr
from edgeq.model_io import save_model
from edgeq.passes.layer_inputs import LayerInputsPass
from edgeq.passes.permute_channels import PermuteChannelsPass
from edgeq.passes.sparsify import Sparsify24Pass, prunable
from edgeq.recipe import Recipe
from edgeq.search import longest_prefix
from edgeq.target import Target

BUDGET_SHARE = 0.5
SENSITIVITY_FEEDS = 64


def require_sparse_kernels(target: Target, recipe: Recipe) -> None:
    if recipe.sparsity != "none" and recipe.sparsity not in target.sparsity.patterns:
        with_kernels = "a target with a [sparsity] section, e.g. jetson-orin or gpu-ampere"
        raise UserError(f"target {target.name} has no {recipe.sparsity} sparse kernels "
                        "(pruned weights would run as dense and only lose accuracy)", f"use {with_kernels}")


class SparsityStage:
    """Prunes ``model`` in place; :attr:`report` says what was done, per layer, and what it cost."""

    def __init__(self, target: Target, recipe: Recipe, runtime, reporter, work: Path, metric=None):
        self.target, self.recipe, self.runtime = target, recipe, runtime
        self.reporter, self.work, self.metric = reporter, work, metric
        self.report: dict = {}
        self._trials = 0

    def __call__(self, model: ir.Model, float_path: Path, calib: CalibrationData,
                 holdout: CalibrationData) -> None:
        recipe, rules = self.recipe, self.target.sparsity
        started = time.perf_counter()
        self.report = {"pattern": recipe.sparsity, "method": recipe.sparsity_method,
                       "permute": recipe.sparsity_permute, "search": []}
        layers = prunable(model, rules)
        if layers and recipe.sparsity_permute:
            with self.reporter.stage(f"permute channels ({len(layers)} layers)"):
                permute = PermuteChannelsPass({layer.node.name for layer in layers}, recipe.seed)
                permute(model)
            self.report["permutation"] = permute.kept
            layers = prunable(model, rules)  # the weights changed
        grams = {}
        if layers:
            with self.reporter.stage(f"layer inputs ({len(layers)} layers, {len(calib)} feeds)"):
                inputs = LayerInputsPass(calib, layers, seed=recipe.seed, on_progress=self.reporter.progress)
                inputs(model)
                grams = inputs.grams
        prune = Sparsify24Pass(rules, grams, recipe.sparsity_method)
        if layers:
            with self.reporter.stage(f"prune {len(layers)} layers to 2:4 ({recipe.sparsity_method})"):
                drop = self._trial(model, prune, set(), float_path, holdout, "all")
            if recipe.max_drop is not None and drop > recipe.max_drop * BUDGET_SHARE:
                names = [layer.node.name for layer in layers]
                with self.reporter.stage(f"sensitivity of {len(names)} layers"):
                    prune.keep_dense = self._fit_budget(model, prune, names, float_path, holdout)
        prune(model)
        self.report |= {"layers": prune.layers, "pruned": prune.pruned,
                        "eligible": len(layers), "budget_share": BUDGET_SHARE,
                        "seconds": time.perf_counter() - started}

    def _trial(self, model: ir.Model, prune: Sparsify24Pass, keep_dense: set[str], float_path: Path,
               holdout: CalibrationData, kind: str, limit: int | None = None) -> float:
        """Prune a copy with ``keep_dense`` left dense; record and return its accuracy drop."""
        candidate = model.clone()
        prune.keep_dense = keep_dense
        prune(candidate)
        self._trials += 1
        folder = self.work / f"sparse-trial-{self._trials}"
        folder.mkdir()
        summary = compare_models(self.runtime, float_path, save_model(candidate, folder / MODEL), holdout,
                                 self.metric, limit)
        drop = accuracy_drop(summary)
        sqnr = worst_sqnr(summary)
        self.report["search"].append({"kind": kind, "pruned": prune.pruned, "drop": drop, "sqnr_db": sqnr})
        return drop

    def _fit_budget(self, model, prune, names: list[str], float_path, holdout) -> set[str]:
        budget = self.recipe.max_drop * BUDGET_SHARE
        sensitivity = {}
        for i, name in enumerate(names):
            self._trial(model, prune, set(names) - {name}, float_path, holdout, "alone", SENSITIVITY_FEEDS)
            sensitivity[name] = self.report["search"][-1]["sqnr_db"]
            self.reporter.progress(i + 1, len(names))
        order = sorted(names, key=lambda n: -sensitivity[n])  # least sensitive (highest SQNR) first
        self.report["sensitivity_sqnr_db"] = sensitivity
        # pruning none fits (no drop); pruning all does not (measured by the caller)
        fits = lambda prefix: self._trial(model, prune, set(order) - set(prefix), float_path, holdout,  # noqa: E731
                                          "prefix") <= budget
        return set(order[longest_prefix(order, fits):])
