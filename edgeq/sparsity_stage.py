"""The 2:4 stage of a compile: [permute channels] → layer input statistics → prune → keep the budget.

Rules:
- Only a target with 2:4 kernels (a ``[sparsity]`` section listing ``2:4``) can be asked for 2:4; layers are
  judged by its rules (:mod:`edgeq.passes.sparsify`).
- Every eligible layer is pruned, unless ``--max-drop`` is given and the sparse float model's accuracy drop
  on the held-out feeds exceeds ``BUDGET_SHARE`` of it (the rest is left for int8). Then each layer's
  sensitivity is measured alone (the worst output SQNR with only that layer pruned), layers are ordered from
  least to most sensitive, and the longest prefix whose combined drop fits is found by bisection
  (:func:`edgeq.search.longest_prefix`); the others stay dense. Every measurement is a trial of the compile's
  search (:mod:`edgeq.search`), strategy ``2:4``, and listed in the report's ``search``.
- The result is deterministic: sensitivity is measured fidelity, not latency.
- A locked build (``edgeq build --locked``) leaves the recorded layers dense and measures nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx_ir as ir

from edgeq.artifact import MODEL
from edgeq.calibration_data import CalibrationData
from edgeq.errors import UserError
from edgeq.fidelity import accuracy_drop
from edgeq.model_io import save_model
from edgeq.passes.layer_inputs import LayerInputsPass
from edgeq.passes.permute_channels import PermuteChannelsPass
from edgeq.passes.sparsify import Sparsify24Pass, prunable
from edgeq.recipe import Recipe
from edgeq.search import Built, Candidate, Trial, Trials, longest_prefix, run
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

    def __init__(self, target: Target, recipe: Recipe, reporter, work: Path, trials: Trials,
                 keep_dense: tuple[str, ...] | None = None):
        self.target, self.recipe, self.reporter, self.work, self.trials = target, recipe, reporter, work, trials
        self.keep_dense = keep_dense  # replayed from a lock instead of measured
        self.report: dict = {}

    def __call__(self, model: ir.Model, calib: CalibrationData) -> None:
        recipe, rules = self.recipe, self.target.sparsity
        started = time.perf_counter()
        self.report = {"pattern": recipe.sparsity, "method": recipe.sparsity_method,
                       "permute": recipe.sparsity_permute}
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
        if layers and self.keep_dense is not None:  # a locked build: the layers its measured build left dense
            prune.keep_dense = set(self.keep_dense)
        elif layers:
            with self.reporter.stage(f"prune {len(layers)} layers to 2:4 ({recipe.sparsity_method})"):
                drop = accuracy_drop(self._trial(model, prune, set(), "all").fidelity)
            if recipe.max_drop is not None and drop > recipe.max_drop * BUDGET_SHARE:
                names = [layer.node.name for layer in layers]
                with self.reporter.stage(f"sensitivity of {len(names)} layers"):
                    prune.keep_dense = self._fit_budget(model, prune, names)
        prune(model)
        self.report |= {"layers": prune.layers, "pruned": prune.pruned,
                        "search": [t.to_dict() for t in self.trials.of("2:4")],
                        "eligible": len(layers), "budget_share": BUDGET_SHARE,
                        "seconds": time.perf_counter() - started}

    def _candidate(self, model: ir.Model, prune: Sparsify24Pass, keep_dense: set[str], label: str,
                   feeds: int | None = None) -> Candidate:
        """A copy pruned with ``keep_dense`` left dense, measured on ``feeds`` held-out feeds (None: all)."""
        facts: dict = {}

        def make():
            candidate = model.clone()
            prune.keep_dense = keep_dense
            prune(candidate)
            folder = self.work / f"sparse-trial-{len(self.trials.log) + 1}"
            folder.mkdir()
            facts["pruned"] = prune.pruned
            return Built(save_model(candidate, folder / MODEL))

        return Candidate("2:4", label, make, feeds=feeds, facts=facts)

    def _trial(self, model, prune, keep_dense: set[str], label: str, feeds: int | None = None) -> Trial:
        return self.trials.measure(self._candidate(model, prune, keep_dense, label, feeds))

    def _fit_budget(self, model, prune, names: list[str]) -> set[str]:
        budget = self.recipe.max_drop * BUDGET_SHARE
        sensitivity = {}
        for i, name in enumerate(names):
            trial = self._trial(model, prune, set(names) - {name}, "alone", SENSITIVITY_FEEDS)
            sensitivity[name] = trial.to_dict()["sqnr_db"]
            self.reporter.progress(i + 1, len(names))
        order = sorted(names, key=lambda n: -sensitivity[n])  # least sensitive (highest SQNR) first
        self.report["sensitivity_sqnr_db"] = sensitivity
        # pruning none fits (no drop); pruning all does not (measured above)
        kept, _ = run(longest_prefix(order, lambda prefix: self._candidate(model, prune, set(order) - set(prefix),
                                                                            "prefix"),
                                     lambda trial: accuracy_drop(trial.fidelity) <= budget), self.trials)
        return set(order[kept:])
