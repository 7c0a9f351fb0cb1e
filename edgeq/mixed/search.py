"""The mixed-precision search: tables, allocation, then build → measure → re-solve until the budgets hold.

Rules:
- Budgets: ``max_drop`` (checked as the compile's fidelity drop), ``latency_ms`` (measured median),
  ``size_mb`` (artifact bytes / 1e6). With a drop budget the search minimizes latency (bytes where latency
  cannot be measured); with only latency or size budgets it minimizes NSR.
- Drop is predicted as k · NSR. k starts from the uniform int8 build (its measured drop over its predicted
  NSR), or ½ — 1 − cosine ≈ NSR / 2 for small independent noise — when int8 measures no drop.
- Each iteration builds the solver's choice and measures it: latency interleaved with float, fidelity on the
  held-out feeds, bytes on disk. A missed drop raises k to what was measured (plus 5%), so the next choice
  has less predicted noise; a missed latency — or, when minimizing latency, a measurement more than
  ``MISPREDICTED`` over the prediction — puts the build's per-node profile and wall time back into the cost
  table (and tightens a missed cap if the choice does not change); a missed size corrects the ungrouped bytes.
- At most ``recipe.mixed_iterations`` builds, each a trial of the compile's search (:mod:`edgeq.search`; this loop
  is one of its strategies); the loop ends early when every budget
  is met as predicted or the solver repeats a choice. Delivered: the best measured build (fastest, or most
  accurate when minimizing noise) among those meeting every budget; if none does, the one that misses by
  the least (summed relative excess), and the compile exits 3.
- When no configuration is predicted to fit, the latency cap, then the size cap, is dropped for that solve
  (the fidelity budget is kept) and the record says so.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from edgeq.fidelity import accuracy_drop, worst_sqnr
from edgeq.mixed.allocate import pareto_front, predicted_nsr, solve
from edgeq.mixed.costs import Costs, group_times, uniform
from edgeq.mixed.groups import Group, layer_groups
from edgeq.mixed.sensitivity import GatedModel, Sensitivity, cached_sensitivity, measure_sensitivity, proxy_nsr
from edgeq.model_io import folder_bytes
from edgeq.runtimes.base import Latency, cost_by_node
from edgeq.search import Candidate, Trial, Trials, run

COSINE_DROP_PER_NSR = 0.5
DROP_MARGIN = 1.05
MISPREDICTED = 1.10
# ``auto`` sensitivity: the proxy only when one-group builds would write more than this (BERT-base with int4:
# ~40 GB). Measured figures are worth minutes: layer-level ones miss how much of a layer's noise reaches the
# output (on the digits transformer, proxy / measured spans 0.5–60 across layers).
PROXY_ABOVE_TRIAL_MB = 20000
MB = 1e6


@dataclass
class Measured:
    """One measured configuration."""

    assign: dict[str, str]
    build: object  # the pipeline's _Build
    drop: float
    fidelity: dict
    bytes: int
    latency: dict[str, Latency] | None = None
    group_ms: dict[str, float] | None = None
    node_ms: dict[str, float] | None = None
    trial: Trial | None = None  # its record in the compile's search

    @property
    def ms(self) -> float | None:
        return self.latency["int8"].median_ms if self.latency else None

    @property
    def sqnr_db(self) -> float:
        return worst_sqnr(self.fidelity)


@dataclass
class SearchResult:
    groups: list[Group]
    sensitivity: Sensitivity
    costs: Costs
    chosen: Measured
    uniform_int8: Measured
    float_ms: float | None
    float_bytes: int
    frontier: list[dict]
    iterations: list[dict] = field(default_factory=list)
    k: float = COSINE_DROP_PER_NSR
    seconds: dict[str, float] = field(default_factory=dict)
    float_times: list = field(default_factory=list)  # the float model's per-kernel profile (NodeTime), if measured

    def to_dict(self) -> dict:
        """The manifest's ``mixed`` section (and what ``report.html`` is drawn from)."""
        chosen = self.chosen.assign
        groups = [{"name": g.name, "nodes": list(g.nodes), "op_type": g.op_type, "precision": chosen[g.name],
                   "nsr": self.sensitivity.nsr[g.name], "ms": self.chosen.group_ms[g.name] if self.chosen.group_ms else None,
                   "ms_by_precision": self.costs.latency[g.name] if self.costs.latency else None,
                   "bytes": self.costs.bytes[g.name][chosen[g.name]], "bytes_by_precision": self.costs.bytes[g.name]}
                  for g in self.groups]
        return {
            "x_axis": "ms" if self.costs.latency is not None else "bytes",
            "groups": groups,
            "sensitivity": {"feeds": self.sensitivity.feeds, "seconds": self.sensitivity.seconds,
                            "cache_hit": self.sensitivity.cache_hit, "proxy_groups": self.sensitivity.proxy_groups,
                            "proxy_scale": self.sensitivity.proxy_scale,
                            "gated_trials": self.sensitivity.gated_trials},
            "drop_per_nsr": self.k,
            "frontier": self.frontier,
            "iterations": self.iterations,
            "chosen": _figures(self.chosen) | {"precisions": precision_counts(chosen)},
            "uniform_int8": _figures(self.uniform_int8),
            "float": {"ms": self.float_ms, "bytes": self.float_bytes},
            "seconds": self.seconds,
        }


def precision_counts(assign: dict[str, str]) -> dict[str, int]:
    """How many groups take each precision, precisions in name order."""
    values = sorted(assign.values())
    return {p: values.count(p) for p in dict.fromkeys(values)}


class MixedPrecisionSearch:
    def __init__(self, recipe, target, runtime, reporter, build: Callable[[dict[str, str]], object], trials: Trials,
                 sensitivity_cache: tuple | None = None,
                 gated: Callable[[list[Group]], GatedModel | None] | None = None):
        """``gated(groups)``: the gated model that runs the groups' int8 trials (:mod:`edgeq.mixed.sensitivity`)."""
        self.recipe, self.target, self.runtime, self.reporter = recipe, target, runtime, reporter
        self.build, self.trials, self.measure = build, trials, trials.timed
        self.sensitivity_cache, self.gated = sensitivity_cache, gated

    def _use_proxy(self, trials: int) -> bool:
        mode = self.recipe.sensitivity
        return mode == "proxy" or (mode == "auto" and trials * self.float_bytes / MB > PROXY_ABOVE_TRIAL_MB)

    def __call__(self, model: ir.Model, float_path: Path, uniform_int8, calib, ranges: dict) -> SearchResult:
        self.float_path = float_path
        self.float_bytes = folder_bytes(float_path.parent)
        rules, precisions = self.target.quantization, self.target.precisions
        groups = layer_groups(model, uniform_int8.insert.decisions, precisions.candidates,
                              rules.activation_fusions, precisions.int4_block_size)
        seconds = {}
        started = time.perf_counter()
        feeds = list(itertools.islice(iter(calib), self.recipe.sensitivity_feeds))
        trials = sum(len(g.precisions) - 1 for g in groups)
        proxy, fresh = {}, cached_sensitivity(self.sensitivity_cache, groups) is None
        if self._use_proxy(trials) and fresh:
            with self.reporter.stage("sensitivity proxy: layer input statistics"):
                proxy = proxy_nsr(model, groups, feeds, ranges, self.target)
        with self.reporter.stage(f"sensitivity: {trials} group × precision figures"):
            gated = self.gated(groups) if self.gated is not None and fresh else None
            sensitivity = measure_sensitivity(groups, lambda p: self.build(p).path, self.runtime, float_path, feeds,
                                              self.sensitivity_cache, self.reporter.progress, proxy, gated)
        seconds["sensitivity"] = time.perf_counter() - started
        started = time.perf_counter()
        with self.reporter.stage("costs: profile whole builds per precision"):
            costs, base = self._costs(groups, uniform_int8)
        seconds["costs"] = time.perf_counter() - started
        self.groups, self.sensitivity, self.costs = groups, sensitivity, costs
        int8_nsr = predicted_nsr(sensitivity, uniform(groups, "int8"))
        k = base.drop / int8_nsr if base.drop > 0 and int8_nsr > 0 else COSINE_DROP_PER_NSR
        started = time.perf_counter()
        iterations, measured = run(self._loop(k), self.trials)
        seconds["search"] = time.perf_counter() - started
        chosen = _pick(measured, self.recipe)
        chosen.trial.chosen = True
        for record, result in zip(iterations, measured):
            record["delivered"] = result is chosen
        frontier = [self._describe(a) for a in pareto_front(groups, sensitivity, costs, self._max_bytes())]
        return SearchResult(groups, sensitivity, costs, chosen, base, self.float_ms, self.float_bytes, frontier,
                            iterations, self.k, seconds, self.float_times)

    # tables ---------------------------------------------------------------------------------------------
    def _costs(self, groups: list[Group], uniform_int8) -> tuple[Costs, Measured]:
        byte_table = {g.name: g.bytes for g in groups}
        rest_bytes = self.float_bytes - sum(g.bytes["float"] for g in groups)
        self.float_ms, self.float_times = None, []
        if not self.measure:
            costs = Costs(None, byte_table, 0.0, rest_bytes)
            assign = uniform(groups, "int8")
            return costs, self._measured(self.trials.measure(self._candidate(assign, uniform_int8, "uniform int8")),
                                         assign, groups)
        self.float_times = self.trials.kernel_times(self.float_path)
        latency = {g: {"float": ms} for g, ms in group_times(groups, cost_by_node(self.float_times, {})).items()}
        costs = Costs(latency, byte_table, 0.0, rest_bytes)
        base = None
        assigns = {precision: uniform(groups, precision)
                   for precision in dict.fromkeys(p for g in groups for p in g.precisions if p != "float")}
        candidates = [self._candidate(assign, uniform_int8 if precision == "int8"
                                      else self.build(_node_precisions(groups, assign)), f"uniform {precision}")
                      for precision, assign in assigns.items()]
        # one batch: the uniform builds do not depend on each other (on a farm, measured in parallel)
        for (precision, assign), trial in zip(assigns.items(), self.trials.measure_batch(candidates)):
            result = self._measured(trial, assign, groups)
            for g, ms in result.group_ms.items():
                if precision in byte_table[g]:
                    latency[g][precision] = ms
            if precision == "int8":
                base = result
                costs.rest_ms = max(0.0, result.ms - sum(result.group_ms.values()))
        return costs, base

    @staticmethod
    def _candidate(assign: dict[str, str], build, label: str) -> Candidate:
        """One configuration as a trial of the compile's search: fidelity on every held-out feed, [latency and
        per-node kernel times]."""
        return Candidate("mixed", label, lambda: build, time=True, feeds=None, profile=True,
                         facts={"precisions": precision_counts(assign)})

    def _measured(self, trial: Trial, assign: dict[str, str], groups: list[Group]) -> Measured:
        build, fidelity = trial.build, trial.fidelity
        result = Measured(assign, build, accuracy_drop(fidelity), fidelity, folder_bytes(build.path.parent),
                          trial=trial)
        if trial.latency:
            result.latency = trial.latency
            if self.float_ms is None:
                self.float_ms = result.latency["float"].median_ms
            result.node_ms = cost_by_node(trial.kernel_times, build.insert.owners)
            result.group_ms = group_times(groups, result.node_ms)
        return result

    # the loop -------------------------------------------------------------------------------------------
    def _max_bytes(self) -> float | None:
        return self.recipe.size_mb * MB if self.recipe.size_mb is not None else None

    def _loop(self, k: float) -> Generator[Candidate, Trial, tuple[list[dict], list[Measured]]]:
        recipe, groups = self.recipe, self.groups
        minimize = "latency" if recipe.max_drop is not None else "nsr"
        max_ms = recipe.latency_ms
        iterations, measured, seen = [], [], set()
        for index in range(recipe.mixed_iterations):
            self.k = k
            assign, relaxed = self._solve(minimize, k, max_ms)
            key = tuple(sorted(assign.items()))
            if key in seen:  # the same choice again: its measurement stands, and nothing new can be learned
                break
            with self.reporter.stage(f"build + measure choice {index + 1}"):
                build = self.build(_node_precisions(groups, assign))
                result = self._measured((yield self._candidate(assign, build, f"choice {index + 1}")), assign, groups)
            seen.add(key)
            measured.append(result)
            record = self._describe(assign) | {"iteration": index + 1, "relaxed": relaxed, "k": k,
                                               "measured": _figures(result), "met": _met(result, recipe)}
            iterations.append(record)
            met = record["met"]
            predicted_ms = record["predicted"]["ms"]
            mispredicted = (minimize == "latency" and predicted_ms is not None
                            and result.ms > predicted_ms * MISPREDICTED)
            if all(met.values()) and not mispredicted:
                break
            if not met.get("max_drop", True):
                k = max(k, result.drop / max(record["predicted"]["nsr"], 1e-12) * DROP_MARGIN)
            if not met.get("latency_ms", True) or mispredicted:
                self.costs.learn(assign, result.group_ms, result.ms, uniform(groups, "int8"))
                if not met.get("latency_ms", True) and self._solve(minimize, k, max_ms)[0] == assign:
                    max_ms *= recipe.latency_ms / result.ms
            if not met.get("size_mb", True):
                self.costs.rest_bytes += result.bytes - self.costs.predict(assign)[1]
        return iterations, measured

    def _solve(self, minimize: str, k: float, max_ms: float | None) -> tuple[dict[str, str], list[str]]:
        """The solver's choice, and the caps dropped to get one: when nothing fits, the latency cap gives way
        (the fastest configuration within the others), then the size cap (the smallest within the drop budget),
        then the drop budget (the fastest configuration of all)."""
        max_nsr = self.recipe.max_drop / k if self.recipe.max_drop is not None else None
        max_ms = max_ms if self.costs.latency is not None else None
        max_bytes = self._max_bytes()
        attempts = [([], minimize, max_nsr, max_ms, max_bytes),
                    (["latency_ms"], "latency", max_nsr, None, max_bytes),
                    (["latency_ms", "size_mb"], "bytes", max_nsr, None, None)]
        for relaxed, objective, nsr_cap, ms_cap, bytes_cap in attempts:
            if relaxed and ({"latency_ms": max_ms, "size_mb": max_bytes}[relaxed[-1]] is None):
                continue  # that cap was not given: relaxing it changes nothing
            assign = solve(self.groups, self.sensitivity, self.costs, objective, nsr_cap, ms_cap, bytes_cap)
            if assign is not None:
                return assign, relaxed
        return solve(self.groups, self.sensitivity, self.costs, "latency"), ["latency_ms", "size_mb", "max_drop"]

    def _describe(self, assign: dict[str, str]) -> dict:
        nsr = predicted_nsr(self.sensitivity, assign)
        ms, size = self.costs.predict(assign)
        return {"precisions": precision_counts(assign), "assign": assign,
                "predicted": {"nsr": nsr, "drop": self.k * nsr, "ms": ms, "bytes": size}}


def _node_precisions(groups: list[Group], assign: dict[str, str]) -> dict[str, str]:
    return {node: assign[g.name] for g in groups for node in g.nodes}


def _figures(result: Measured) -> dict:
    return {"drop": result.drop, "sqnr_db": result.sqnr_db, "ms": result.ms, "bytes": result.bytes,
            "float_ms": result.latency["float"].median_ms if result.latency else None}


def _met(result: Measured, recipe) -> dict[str, bool]:
    met = {}
    if recipe.max_drop is not None:
        met["max_drop"] = result.drop <= recipe.max_drop
    if recipe.latency_ms is not None and result.ms is not None:
        met["latency_ms"] = result.ms <= recipe.latency_ms
    if recipe.size_mb is not None:
        met["size_mb"] = result.bytes <= recipe.size_mb * MB
    return met


def _excess(result: Measured, recipe) -> float:
    """Summed relative excess over the budgets (0 when all are met)."""
    excess = 0.0
    if recipe.max_drop is not None:
        excess += max(0.0, result.drop - recipe.max_drop) / max(recipe.max_drop, 1e-9)
    if recipe.latency_ms is not None and result.ms is not None:
        excess += max(0.0, result.ms - recipe.latency_ms) / recipe.latency_ms
    if recipe.size_mb is not None:
        excess += max(0.0, result.bytes - recipe.size_mb * MB) / (recipe.size_mb * MB)
    return excess


def _pick(measured: list[Measured], recipe) -> Measured:
    meeting = [m for m in measured if _excess(m, recipe) == 0]
    if not meeting:
        return min(measured, key=lambda m: _excess(m, recipe))
    if recipe.max_drop is not None and all(m.ms is not None for m in meeting):
        return min(meeting, key=lambda m: m.ms)
    return min(meeting, key=lambda m: m.drop)
