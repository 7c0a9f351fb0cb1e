"""The compile pipeline: float ONNX in, a measured int8 (or, when int8 does not pay, float) artifact out.

    load → normalize → exclude → [2:4 prune] → [CLE, SmoothQuant] → calibrate → optional op set → fidelity
         guard [→ GPTQ + bias correction → groups back to float] → no-slowdown [→ op set again] → artifact
         [→ 2:4 check]

Rules:
- The user's model must load and run in ONNX Runtime; the normalized model must compute what it computes
  (:mod:`edgeq.model_check`, on a few calibration feeds), and so must any opset conversion a build needs and
  any float rewrite of the PTQ techniques (undone, and said so, when it does not).
- Fidelity is measured on feeds held back from calibration (or the ``--eval`` set) — on every feed when fewer
  than ``MIN_HELD_OUT`` are held back — always against the dense float model; a quantized build whose outputs hold NaN/Inf where float's do not is never delivered; a 2:4
  model (:mod:`edgeq.sparsity_stage`) is what int8 starts from and the float model delivered.
- Latency is float vs int8 in one process, interleaved, on the target's runtime settings.
- Every measured choice is a strategy of :mod:`edgeq.search`, and every build it measured is a trial in the
  manifest's ``search.trials``: the optional op set (:mod:`edgeq.search.op_sets`: ``auto`` measures all, none,
  all but one group, and all + dynamic int8 MatMuls, and keeps the most accurate within 5% of the fastest;
  measured again, held to the guard, where the guard returned groups to float and int8 was not yet faster),
  the fidelity guard (:mod:`edgeq.guard`), the no-slowdown rounds (:mod:`edgeq.search.no_slowdown`), the 2:4
  layers and the mixed-precision loop.
- int8 is delivered only when its median latency is at most ``recipe.max_ratio`` (0.97) of float's: a gain
  inside measurement noise does not pay for the accuracy int8 costs; a build of at most half float's bytes
  need only be not measurably slower (``recipe.max_ratio_smaller``, 1.01): its size gain pays. The
  no-slowdown rounds still aim at ``max_ratio``; if the fastest build they measured is above its bar, the
  float model is delivered and the manifest says why. Without a reachable device nothing is measured, and
  the manifest says that instead.
- ``--scheme mixed`` replaces the guard and the no-slowdown rounds with the mixed-precision search
  (:mod:`edgeq.mixed`): after the optional op set is chosen, each layer group gets float, int8 or int4 from
  measured sensitivity and measured per-group latency, within the budgets, checked by building and measuring
  (bounded); ``report.html`` then shows its plot too. (``int8`` in the manifest's
  latency and per-node tables means the quantized build, mixed included.)
- The budgets (``recipe.max_drop``; with mixed also ``latency_ms`` and ``size_mb``) decide the exit code:
  3 when one is missed, with the artifact still written.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ContextManager, Protocol

import numpy as np
import onnx_ir as ir

from edgeq import guard, scratch
from edgeq.artifact import MODEL, ArtifactWriter, tool_versions
from edgeq.cache import JsonCache
from edgeq.devices import device_summary, open_device
from edgeq.devices.local import LocalDevice
from edgeq.calibration_data import CalibrationData, InputSpec, input_specs
from edgeq.errors import EXIT_BUDGET_MISSED, EXIT_OK, UserError
from edgeq.fidelity import accuracy_drop, load_metric
from edgeq.lock import Decisions, apply_weights
from edgeq.mixed.costs import group_times
from edgeq.mixed.groups import layer_groups
from edgeq.mixed.search import MB, MixedPrecisionSearch, SearchResult, precision_counts
from edgeq.mixed.sensitivity import GatedModel, cached_sensitivity, measure_sensitivity, proxy_nsr
from edgeq.model_check import (CHECK_FEEDS, check_same_function, load_in_onnxruntime, normalize_checked, run_feeds,
                               runtime_readable)
from edgeq.model_io import folder_bytes, load_model, model_digest, save_model
from edgeq.passes.calibrate import CalibratePass
from edgeq.passes.convert_opset import ConvertOpsetPass, default_opset
from edgeq.passes.normalize import NormalizePass
from edgeq.passes.exclude import ExcludePass
from edgeq.passes.gate_qdq import GateQDQPass
from edgeq.passes.pool_as_reduce import PoolAsReducePass, windows_tile
from edgeq.passes.insert_qdq import (DYNAMIC, EMBEDDING, WIDE_OPSET, WIDE_OPSET_PRECISIONS, InsertQDQPass,
                                     dynamic_ineligible)
from edgeq.search import Candidate, Trial, Trials, run
from edgeq.search.no_slowdown import no_slowdown
from edgeq.search.op_sets import (ACT_MATMUL, AFTER_GUARD, DYNAMIC_MATMUL, POOL_AS_REDUCE, PSEUDO_OPS, choose_op_set,
                                  op_set_candidates)
from edgeq.search.ranges import choose_ranges
from edgeq.ptq_stage import PtqStage
from edgeq.recipe import PTQ_ON_GUARD_MISS, Recipe
from edgeq.runtimes import ort_format, tensorrt
from edgeq.runtimes.base import cost_by_node
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.sparse24 import KEY as SPARSITY_KEY
from edgeq.sparse24 import check_model
from edgeq.sparsity_stage import SparsityStage, require_sparse_kernels
from edgeq.target import Target


# The guard's sensitivity runs the groups the gated model cannot serve one build each (a build and a session:
# ~3 s for a 6 MB model); with more such groups than this, ``--sensitivity auto`` estimates one-layer groups
# from their input statistics instead (the proxy of edgeq.mixed.sensitivity, scaled by three measured groups):
# the bisection checks every order.
GUARD_BUILDS = 16
# After a guard miss, the most sensitive groups, this many, are repaired before any returns to float: their
# weights' rounding reconstructed (GPTQ) and biases corrected (--ptq auto), their tensors' calibration method
# chosen. On the real-model corpus, GPTQ + bias correction on every layer held the guard for none of the
# models uniform int8 missed it on (Sapphire Rapids) and cost 0.6-28 s; on the worst layers, a few seconds.
REPAIR_GROUPS = 3
REPLAYED_FLOAT = "replayed from the lock: its measured build delivered float"
RETURNED_BY_GUARD = "returned to float by the fidelity guard (measured)"
RETURNED_SLOWER = "returned to float: int8 was slower here (measured)"
# The DynamicMatMul op set is a candidate where its layers hold this share of the weights (transformers, MLPs):
# a CNN's classifier alone does not pay for one more build.
DYNAMIC_SHARE = 0.5
# Fewer held-out feeds than this (no --eval) cannot show a decision that changes in one sample of 20: the
# fidelity is then judged on every feed, calibration feeds included (a table decoder changed 9 tables of 100
# that its 6 held-out tables did not show).
MIN_HELD_OUT = 20


class Reporter(Protocol):
    def stage(self, name: str) -> ContextManager: ...

    def progress(self, done: int, total: int) -> None: ...


class SilentReporter:
    def stage(self, name: str) -> ContextManager:
        return contextlib.nullcontext()

    def progress(self, done: int, total: int) -> None:
        pass


@dataclass(frozen=True)
class CompileRequest:
    model: Path
    target: Target
    recipe: Recipe
    out_dir: Path
    calib: Path | None = None
    eval: Path | None = None
    metric: str | None = None
    cache_dir: Path | None = None
    measure: bool = True
    keep_float: tuple[str, ...] = ()  # replay of earlier no-slowdown decisions
    replay: Decisions | None = None  # a locked build: every measured decision applied as recorded (edgeq.lock)
    replay_weights: dict | None = None  # a locked build: the weights it recorded (edgeq.lock, rule 4)
    expected_files: dict[str, str] | None = None  # a locked build: artifact file → SHA-256 it must have

    @property
    def input_paths(self) -> tuple[Path, ...]:
        """The files and folders this compile reads (``-o`` must not hold them)."""
        metric_file = self.metric.rpartition(":")[0] if self.metric and ".py:" in self.metric else None
        return tuple(Path(p) for p in (self.model, self.calib, self.eval, metric_file) if p)

    @property
    def artifact_room(self) -> int:
        """Bytes the artifact may need: the model's (and its external data's) twice over (float + a build)."""
        model = Path(self.model)
        parts = [model, *(p for p in model.parent.glob("*.data") if p.is_file())] if model.is_file() else []
        return 2 * sum(p.stat().st_size for p in parts)


@dataclass
class _Build:
    path: Path
    insert: InsertQDQPass

    @property
    def quantized(self) -> list[str]:
        return sorted(n for n, d in self.insert.decisions.items() if d.quantized)


def compile_model(request: CompileRequest, reporter: Reporter | None = None) -> tuple[dict, int]:
    """Run the whole pipeline and publish the artifact; returns (manifest, exit code)."""
    reporter = reporter or SilentReporter()
    if request.recipe.runtime == "tvm":
        from edgeq.tvm_compile import compile_tvm  # imports TVM's runtime module: only this path pays for it

        return compile_tvm(request, reporter)
    require_sparse_kernels(request.target, request.recipe)
    if request.recipe.package == "ort":
        ort_format.style_for(request.target)  # refused before any work where it cannot serve
    metric = load_metric(request.metric) if request.metric else None
    scratch.sweep()
    with ArtifactWriter(request.out_dir, request.input_paths, request.artifact_room) as writer, \
            scratch.scratch_dir("compile") as work, _measuring_device(request) as device:
        run = _Compilation(request, reporter, Path(work), metric, device)
        run.prepare()
        run.choose_op_set()
        if request.recipe.scheme == "mixed":
            run.allocate_bits()
        else:
            run.hold_guard()
            run.guard_speed()
        with reporter.stage(f"fidelity on {run.delivered_feeds or len(run.holdout)} feeds"):
            fidelity = run.delivered_fidelity()
            if run.delivered != "float" and fidelity["nonfinite_outputs"]:
                run.delivered = "float"
                run.reason = (f"the quantized build output NaN or Inf where float does not (output "
                              f"{', '.join(fidelity['nonfinite_outputs'])}): a broken model is never delivered")
                fidelity = run.delivered_fidelity()
            if run.guard_applies:
                fidelity["guard"] = guard.check(fidelity)
                if run.delivered != "float" and not fidelity["guard"]["met"]:  # the speed rounds broke it
                    run.delivered = "float"
                    run.reason = ("the int8 build left by the no-slowdown rounds missed the fidelity guard ("
                                  + guard.describe(fidelity["guard"]) + "): float is delivered")
                    fidelity = run.delivered_fidelity()
                    fidelity["guard"] = guard.check(fidelity)
        fidelity["device"] = run.runtime.fidelity_device.address  # where the outputs were computed
        caveat = request.target.int8_caveat_here() if run.delivered != "float" and fidelity["device"] == "local" else ""
        if caveat:
            fidelity["caveat"] = caveat
        float_bytes = folder_bytes(run.float_path.parent)
        delivered = run.runtime.build(run.delivered_path, writer.tmp)
        delivered_bytes = folder_bytes(writer.tmp)
        delivered_ms = run.latency["float" if run.delivered == "float" else "int8"].median_ms if run.latency else None
        budget, exit_code = _budget(request.recipe, fidelity, delivered_ms, delivered_bytes, request.replay is not None)
        manifest = run.manifest(fidelity, budget, delivered_bytes, float_bytes)
        if request.recipe.package == "ort":
            with reporter.stage("package: model.ort + reduced-build operator config, checked"):
                feeds = [feed.inputs for feed in itertools.islice(iter(run.holdout), CHECK_FEEDS)]
                manifest["package"] = ort_format.package(delivered, writer.tmp, request.target, feeds)
        if run.mixed is not None:
            manifest["mixed"] = run.mixed.to_dict()
        if run.sparsity is not None or SPARSITY_KEY in run.model.metadata_props:  # or 2:4 weights came in
            manifest["sparsity"] = (run.sparsity.report if run.sparsity else {}) | {
                "check": _check_sparsity(delivered)}
        if tensorrt.uses_tensorrt(request.target):
            int8 = run.delivered != "float" and run.has_int8
            manifest["deploy"] = tensorrt.deployment(request.target, MODEL, int8=int8,
                                                     sparse=bool(run.sparsity and run.sparsity.report["pruned"]))
        writer.publish(manifest, request.expected_files)
    return manifest, exit_code


class _Compilation:
    """The state of one compile, step by step; :func:`compile_model` drives it."""

    def __init__(self, request: CompileRequest, reporter: Reporter, work: Path, metric=None, device=None):
        self.request, self.recipe, self.target = request, request.recipe, request.target
        self.metric = metric
        self.sparsity: SparsityStage | None = None
        self.rules = request.target.quantization
        self.reporter, self.work = reporter, work
        why_not = device.check(request.target) if device is not None else "disabled"
        self.measure = not why_not
        self.why_not_measured = why_not
        self.device = device if self.measure else None
        self.runtime = OnnxRuntime(request.target, self.device)
        self.latency = None
        self.profiles: dict[str, dict[str, float]] = {}
        self.delivered, self.reason = "int8", ""
        self.mixed: SearchResult | None = None
        self._wide = None  # the model at WIDE_OPSET, made when an int4/int16 build first needs it
        self.guard_report: dict = {}
        self.guard_failed = False
        self.guard_float_nodes: set[str] = set()  # the nodes of the groups the guard returned to float

    def prepare(self) -> None:
        """Load, normalize (checked against the original in ONNX Runtime), mark exclusions, [prune to 2:4],
        calibrate."""
        with self.reporter.stage("load"):
            model = load_model(self.request.model)
            source = runtime_readable(model, Path(self.request.model), self.work / "source")
            NormalizePass.refuse_quantized(model)
            self.source_digest = model_digest(model)
            source_opset = default_opset(model)
        self.calib, self.holdout, self.data_info = _calibration_sets(self.request, input_specs(model))
        with self.reporter.stage("normalize"):
            self.check_feeds = [f.inputs for f in itertools.islice(self.calib, CHECK_FEEDS)]
            self.float_path = _fresh_dir(self.work / "float") / MODEL
            model, check = normalize_checked(model, source, self.check_feeds, self.float_path)
            self.normalize_check = {"opset": [source_opset, default_opset(model)]} | check
            self.normalized_digest = normalized_digest = model_digest(model)
        self.feed = next(iter(self.holdout)).inputs
        self.trials = Trials(self.runtime, self.float_path, self.feed, self.holdout, self.recipe, self.metric,
                             timed=self.measure)
        ExcludePass(self.recipe.exclude)(model)
        names = {node.name for node in ir.traversal.RecursiveGraphIterator(model.graph)}
        unknown = sorted(set(self.request.keep_float) - names)
        if unknown:  # a typo, or "a,b" for two names, would otherwise quantize what the user meant to keep
            raise UserError(f"--keep-float names no node called {', '.join(map(repr, unknown))}",
                            "give one node per --keep-float, named as the manifest's decisions name it")
        self.base_path = self.float_path  # what int8 starts from, and the float model delivered
        if self.recipe.sparsity != "none":
            replay = self.request.replay
            self.sparsity = SparsityStage(self.target, self.recipe, self.reporter, self.work, self.trials,
                                          replay.keep_dense if replay else None)
            self.sparsity(model, self.calib)
            if self.request.replay_weights:
                apply_weights(model, self.request.replay_weights)
            if self.sparsity.report["pruned"]:
                self.base_path = save_model(model, _fresh_dir(self.work / "sparse") / MODEL)
                normalized_digest = model_digest(model)
        self.ptq = PtqStage(self.recipe.ptq, self.reporter, self.recipe.seed, bool(self.request.replay_weights))
        model, rewritten = self._rewrite_before_calibration(model)
        if rewritten:  # an equalized or smoothed model calibrates anew
            normalized_digest = model_digest(model)
        rules = self.rules
        op_types = set(rules.compute_ops + rules.requant_ops + rules.passthrough_ops + rules.activation_fusions
                       + (("LSTM",) if rules.dynamic_lstm else ()))  # whether an LSTM's input is always finite
        self.calibrator = CalibratePass(self.calib, op_types, self.recipe.method, self.recipe.percentile,
                                        normalized_digest, self.request.cache_dir, on_progress=self.reporter.progress)
        replay = self.request.replay
        started = time.perf_counter()
        if replay is not None and replay.activation_ranges is not None and replay.nonfinite is not None:
            with self.reporter.stage("calibration: the lock's ranges"):  # the same bytes anywhere, no run
                self.calibrator.restore(replay.activation_ranges, replay.nonfinite)
        else:
            with self.reporter.stage(f"calibrate ({self.recipe.method}, {len(self.calib)} feeds)"):
                self.calibrator(model)
        self.calib_seconds = time.perf_counter() - started
        self.model = model
        self.ranges = self.calibrator.ranges  # the ranges builds use (a per-tensor choice may replace some)
        self.ranges_chosen: dict[str, str] = {}
        if replay is not None and replay.activation_ranges is not None:  # the lock's: the same bytes anywhere
            self.ranges = {name: tuple(r) for name, r in replay.activation_ranges.items()}
            self.ranges_chosen = dict(replay.ranges)
        self.ptq.after_calibration(model, self.calib)

    def _rewrite_before_calibration(self, model):
        """The PTQ float rewrites (CLE, SmoothQuant), checked in ONNX Runtime to compute what the model computed;
        one that does not is undone and the manifest says so. Returns (model, whether it was rewritten)."""
        original = model.clone() if self.ptq.rewrites_before_calibration else None
        if original is None or not self.ptq.before_calibration(model, self.calib, self.rules):
            return model, False
        path = save_model(model, _fresh_dir(self.work / "rewritten") / MODEL)
        reference = run_feeds(load_in_onnxruntime(self.float_path), self.check_feeds)
        try:
            self.ptq.function_check = check_same_function(self.float_path, path, self.check_feeds, reference,
                                                          "the PTQ rewrite")
        except UserError as problem:
            self.ptq.function_check = {"undone": problem.problem}
            return original, False
        return model, True

    def builder(self, optional_ops: tuple[str, ...]):
        """A function (keep_float, tag[, precisions, ranges]) -> _Build that inserts QDQ with this optional op set
        (ranges: replacing the ones in use)."""
        rules = replace(self.rules, requant_ops=tuple(o for o in optional_ops if o not in PSEUDO_OPS),
                        activation_matmuls=ACT_MATMUL in optional_ops)
        dynamic = (self._dynamic_layers() if DYNAMIC_MATMUL in optional_ops else ()) + self._dynamic_lstms()

        def build(keep_float: set[str], tag: str, precisions: dict[str, str] | None = None,
                  ranges: dict[str, tuple[float, float]] | None = None) -> _Build:
            wide = precisions and any(p in WIDE_OPSET_PRECISIONS for p in precisions.values())
            # an LSTM's int8 is dynamic int8, and so, with DynamicMatMul, is a dynamic-capable layer's
            precisions = {**{n: DYNAMIC for n in dynamic}, **(precisions or {})}
            precisions = {n: DYNAMIC if n in dynamic and p == "int8" else p for n, p in precisions.items()}
            candidate = (self._model_at_wide_opset() if wide else self.model).clone()
            insert = InsertQDQPass(rules, self.ranges if ranges is None else ranges, keep_float, precisions,
                                   self.target.precisions.int4_block_size, set(self.calibrator.nonfinite))
            insert(candidate)
            if POOL_AS_REDUCE in optional_ops:
                PoolAsReducePass()(candidate)
            self.ptq(candidate)
            if self.request.replay_weights:
                apply_weights(candidate, self.request.replay_weights)
            folder = _fresh_dir(self.work / f"int8-{'-'.join(optional_ops) or 'none'}-{tag}")
            return _Build(save_model(candidate, folder / MODEL), insert)
        return build

    def _gated_model(self, groups: list) -> GatedModel | None:
        """The uniform int8 build in use (rebuilt with static int8 where the op set made layers dynamic, and its
        LSTMs and embeddings float), gated site by site (:mod:`edgeq.passes.gate_qdq`), with the gates of each
        group's one-group int8 build; None where the model cannot be gated (the groups are then built one by one,
        as are groups of dynamic int8 layers and embeddings: they have no Q/DQ site to gate)."""
        build, keep = self.current, set(self.current.insert.keep_float)
        lstms = set(self._dynamic_lstms())
        dynamic = lstms | (set(self._dynamic_layers()) if DYNAMIC_MATMUL in self.candidates[self.chosen] else set())
        embeddings = {n for n, d in build.insert.decisions.items() if d.quantized and d.reason == EMBEDDING}
        if dynamic or embeddings:
            build = self.builder(tuple(o for o in self.candidates[self.chosen] if o != DYNAMIC_MATMUL))(
                keep, "gated", dict.fromkeys(lstms | embeddings, "float"))
        model = ir.load(build.path)
        gate = GateQDQPass(self.model)
        try:
            gate(model)
        except ValueError:
            return None
        path = save_model(model, _fresh_dir(self.work / "gated") / MODEL)
        all_float = {node: "float" for g in groups for node in g.nodes}
        gates = {}
        for group in groups:
            nodes, tensors = InsertQDQPass(build.insert.rules, self.ranges, keep,
                                           all_float | dict.fromkeys(group.nodes, "int8"),
                                           unbounded=build.insert.unbounded).planned(self.model)
            if dynamic & set(group.nodes) or not set(group.nodes) <= nodes or not tensors <= gate.sites.keys():
                continue  # dynamic int8, or a site the gated model lacks: built
            gates[group.name] = np.zeros(len(gate.sites), dtype=bool)
            gates[group.name][[gate.sites[site] for site in tensors | (nodes & gate.sites.keys())]] = True
        return GatedModel(path, gates)

    def _int8_savings(self, groups: list) -> dict[str, float]:
        """Per group, the milliseconds its int8 kernels save over float: per-node profiles of the float model and
        of the build in use, each kernel attributed to the original node it serves."""
        owners = self.current.insert.owners
        float_ms, int8_ms = (group_times(groups, cost_by_node(self.trials.kernel_times(path), owners))
                             for path in (self.float_path, self.current.path))
        return {name: round(ms - int8_ms[name], 4) for name, ms in float_ms.items()}

    def _dynamic_layers(self) -> tuple[str, ...]:
        """The main-graph MatMul/Gemm layers that dynamic int8 can serve."""
        return self._dynamic_capable(n for n in self.model.graph if n.op_type in self.rules.compute_ops)

    def _dynamic_lstms(self) -> tuple[str, ...]:
        """The LSTMs (at any depth) that dynamic int8 can serve, where the target has the kernel."""
        return self._dynamic_capable(n for n in ir.traversal.RecursiveGraphIterator(self.model.graph)
                                     if n.op_type == "LSTM") if self.rules.dynamic_lstm else ()

    def _dynamic_capable(self, nodes) -> tuple[str, ...]:
        """Of ``nodes``, those dynamic int8 can serve, reading an input calibration saw always finite (a run-time
        scale from an infinite range would turn the whole output into NaN)."""
        seen, nonfinite = self.calibrator.ranges, self.calibrator.nonfinite
        return tuple(n.name for n in nodes if dynamic_ineligible(n) is None and n.inputs[0].name in seen
                     and n.inputs[0].name not in nonfinite)

    def _dynamic_weight_share(self) -> float:
        """The share of the compute layers' constant weights that dynamic int8 layers would hold."""
        weights = {n.name: n.inputs[1].const_value.size for n in self.model.graph
                   if n.op_type in self.rules.compute_ops and len(n.inputs) > 1 and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None}
        total = sum(weights.values())
        return sum(weights.get(n, 0) for n in self._dynamic_layers()) / total if total else 0.0

    def _model_at_wide_opset(self):
        """The calibrated model converted (once, and checked in ONNX Runtime) to the opset int4 and int16 Q/DQ
        need: converted by the one converter, never relabelled."""
        if self._wide is None:
            model = self.model.clone()
            ConvertOpsetPass(WIDE_OPSET)(model)
            path = save_model(model, _fresh_dir(self.work / f"opset{WIDE_OPSET}") / MODEL)
            reference = run_feeds(load_in_onnxruntime(self.float_path), self.check_feeds)
            check_same_function(self.float_path, path, self.check_feeds, reference,
                                f"converting the model to opset {WIDE_OPSET}")
            self._wide = model
        return self._wide

    def choose_op_set(self) -> None:
        present = {n.op_type for n in self.model.graph}
        if any(n.op_type in ("MatMul", "Gemm") and len(n.inputs) > 1 and n.inputs[1] is not None
               and n.inputs[1].const_value is None for n in self.model.graph):
            present.add(ACT_MATMUL)
        if self._dynamic_weight_share() >= DYNAMIC_SHARE:
            present.add(DYNAMIC_MATMUL)
        if any(windows_tile(n) for n in self.model.graph):
            present.add(POOL_AS_REDUCE)
        available = (self.rules.requant_ops + ((ACT_MATMUL,) if self.rules.activation_matmuls else ())
                     + ((DYNAMIC_MATMUL,) if self.rules.dynamic_matmuls else ())
                     + ((POOL_AS_REDUCE,) if self.rules.pool_as_reduce else ()))
        self.candidates = op_set_candidates(self.recipe.optional_ops, available, present)
        makers = {label: (lambda ops=ops: self.builder(ops)(set(self.request.keep_float), "0"))
                  for label, ops in self.candidates.items()}
        self.chosen = next(iter(makers))
        if len(makers) > 1 and self.measure:
            with self.reporter.stage(f"measure {len(makers)} optional op sets"):
                self.chosen = run(choose_op_set(makers), self.trials)
            self.current = next(t.build for t in self.trials.of("op set") if t.chosen)
        else:
            with self.reporter.stage("insert QDQ"):
                self.current = makers[self.chosen]()

    @property
    def guard_applies(self) -> bool:
        """The default fidelity guard holds an int8 build unless the user stated a metric or budget."""
        recipe = self.recipe
        return recipe.guard and recipe.scheme == "int8" and recipe.max_drop is None and self.metric is None

    def hold_guard(self) -> None:
        """The default fidelity guard (:mod:`edgeq.guard`): when the chosen int8 build misses it, each group's
        sensitivity is measured and the REPAIR_GROUPS most sensitive groups are repaired — [with ``--ptq auto``,
        GPTQ rounding and bias correction on their layers, kept if they measure no worse;] their tensors try
        the other calibration methods' ranges; then the fewest groups, those with most noise per millisecond
        int8 saves, return to float until it holds; if only float holds it, float is delivered, saying why."""
        if not self.guard_applies or not self.current.quantized:
            return
        if self.request.replay is not None:
            return self._replay_guard(self.request.replay)
        with self.reporter.stage("fidelity guard"):
            current = self.current
            uniform = guard.checked(self.trials.measure(Candidate("guard", "uniform int8", lambda: current,
                                                                  feeds=None)))
        self.guard_report = {"thresholds": guard.THRESHOLDS, "uniform_int8": uniform}
        if uniform["met"]:
            return
        build_with = self.builder(self.candidates[self.chosen])
        keep, tags = set(self.current.insert.keep_float), itertools.count(1)
        groups = layer_groups(self.model, self.current.insert.decisions, ("float", "int8"),
                              self.rules.activation_fusions, self.target.precisions.int4_block_size)
        feeds = list(itertools.islice(iter(self.calib), self.recipe.sensitivity_feeds))
        with self.reporter.stage(f"guard: sensitivity of {len(groups)} groups"):
            cache = self._sensitivity_cache()
            mode, fresh = self.recipe.sensitivity, cached_sensitivity(cache, groups) is None
            gated = self._gated_model(groups) if fresh else None
            built = [g for g in groups if gated is None or g.name not in gated.gates]
            proxy = proxy_nsr(self.model, groups if mode == "proxy" else built, feeds, self.ranges, self.target) \
                if mode == "proxy" or (mode == "auto" and len(built) > GUARD_BUILDS and fresh) else {}
            table = measure_sensitivity(groups, lambda p: build_with(keep, f"guard-sens{next(tags)}", p).path,
                                        self.runtime, self.float_path, feeds,
                                        cache, self.reporter.progress, proxy, gated)
        nsr = {name: figures["int8"] for name, figures in table.nsr.items()}
        self.guard_report |= {"sensitivity": nsr, "sensitivity_feeds": table.feeds, "sensitivity_seconds": table.seconds,
                              "sensitivity_proxy_groups": table.proxy_groups,
                              "sensitivity_gated_trials": table.gated_trials}
        worst = sorted(groups, key=lambda g: -nsr[g.name])[:REPAIR_GROUPS]
        if self.ptq.auto:
            uniform = self._try_ptq(build_with, keep, uniform, worst)
        if not uniform["met"]:
            uniform = self._choose_ranges(build_with, keep, tags, worst, uniform)
        if uniform["met"]:
            return
        with self.reporter.stage("guard: return the groups with most noise per ms saved to float"):
            savings = self._int8_savings(groups) if self.measure else None
            held = run(guard.hold(groups, nsr, lambda nodes: build_with(keep | nodes, f"guard{next(tags)}"), uniform,
                                  savings), self.trials)
        self.guard_report |= {"int8_savings_ms": savings, "float_groups": held.float_groups, "trials": held.trials}
        if held.build is None:
            self.delivered, self.guard_failed = "float", True
            self.why_not_measured = "float delivered: no int8 build holds the fidelity guard"
            self.reason = ("no int8 build holds the fidelity guard (" + guard.describe(uniform) + "); "
                           "--metric/--max-drop state your own, --no-guard turns it off")
        else:
            self.current = held.build
            self.guard_float_nodes = {n for g in groups if g.name in held.float_groups for n in g.nodes}

    def _op_set_after_guard(self, held) -> Trial | None:
        """Where the guard returned groups to float, the AFTER_GUARD op sets fastest before the guard (the one in
        use aside) measured again with those groups float (``held``'s keep_float); the fastest that holds the
        guard becomes the choice and its trial is returned (:mod:`edgeq.search.op_sets`); None where there is
        nothing to measure or none holds."""
        before = {t.candidate.label: t.ratio for t in self.trials.of("op set") if t.candidate.label in self.candidates}
        others = sorted((label for label in before if label != self.chosen), key=before.get)[:AFTER_GUARD]
        if not self.guard_float_nodes or not others:
            return None
        keep = set(held.insert.keep_float)
        makers = {f"{label} (the guard's float groups)":
                  (lambda ops=self.candidates[label]: self.builder(ops)(keep, "after-guard")) for label in others}
        with self.reporter.stage(f"measure {len(makers)} optional op sets again, the guard's groups float"):
            chosen = run(choose_op_set(makers, lambda trial: guard.checked(trial)["met"]), self.trials)
        if chosen is None:
            return None
        self.chosen = next(label for label, made in zip(others, makers) if made == chosen)
        return next(t for t in self.trials.of("op set") if t.chosen and t.candidate.label == chosen)

    def _replay_guard(self, decisions: Decisions) -> None:
        """A locked build: the guard's recorded choices applied, nothing measured — PTQ where it was kept; its
        per-tensor ranges are in the recorded activation ranges, its float groups in the recorded keep_float.
        A float delivery needs none of it."""
        if not decisions.ptq_on_guard_miss or decisions.delivered == "float":
            return
        with self.reporter.stage("replay the guard's choices"):
            self.ptq.after_calibration(self.model, self.calib, PTQ_ON_GUARD_MISS)
            self.ptq.on_guard_miss = {"tried": list(PTQ_ON_GUARD_MISS), "kept": True}
            build_with = self.builder(self.candidates[self.chosen])
            self.current = build_with(set(self.current.insert.keep_float), "replay")

    def _choose_ranges(self, build_with, keep: set[str], tags, worst: list, uniform: dict) -> dict:
        """After a guard miss: the calibration method per tensor of the most sensitive groups ``worst``
        (:mod:`edgeq.search.ranges`); ranges that measured better are checked against the guard on every
        held-out feed and kept (for every later build) when they hold it or leave none of its figures worse.
        Returns the guard check of the build kept."""
        nodes = {n.name: n for n in self.model.graph}

        def tensors(group) -> list[str]:
            values = []
            for node in (nodes[name] for name in group.nodes if name in nodes):
                users = list(node.outputs[0].uses())
                fused = users[0][0] if len(users) == 1 and users[0][0].op_type in self.rules.activation_fusions else None
                values += [*node.inputs, *node.outputs, *(fused.outputs if fused else ())]
            return [v.name for v in values if v is not None and v.name in self.ranges]

        wanted = [name for group in worst for name in tensors(group)]
        if not wanted:
            return uniform
        with self.reporter.stage(f"guard: calibration method per tensor of {len(worst)} groups"):
            by_method = self.calibrator.ranges_by_method(self.model, wanted)
            ranges, chosen, build = run(choose_ranges(worst, tensors, by_method, self.ranges,
                                                      lambda r: build_with(keep, f"ranges{next(tags)}", ranges=r),
                                                      self.current), self.trials)
            if not chosen:
                return uniform
            trial = self.trials.measure(Candidate("guard", "per-tensor ranges", lambda: build, feeds=None))
            checked = guard.checked(trial)
        self.guard_report["with_ranges"] = checked
        if not (checked["met"] or guard.no_worse(checked, uniform)):
            return uniform
        trial.chosen = True
        self.ranges, self.ranges_chosen, self.current = ranges, chosen, trial.build
        return checked

    def _try_ptq(self, build_with, keep: set[str], uniform: dict, worst: list) -> dict:
        """``--ptq auto`` after a guard miss: the same build with PTQ_ON_GUARD_MISS on the layers of the most
        sensitive groups ``worst``; kept (and used by every later build) when it holds the guard, or when none
        of the guard's figures is worse. Returns the guard check of the build kept."""
        layers = {node for group in worst for node in group.nodes}
        with self.reporter.stage(f"guard: try {' + '.join(PTQ_ON_GUARD_MISS)} on {len(worst)} groups"):
            self.ptq.after_calibration(self.model, self.calib, PTQ_ON_GUARD_MISS, only=layers)
            trial = self.trials.measure(Candidate("guard", " + ".join(PTQ_ON_GUARD_MISS),
                                                  lambda: build_with(keep, "guard-ptq"), feeds=None))
            checked = guard.checked(trial)
        kept = trial.chosen = checked["met"] or guard.no_worse(checked, uniform)
        self.guard_report["with_ptq"] = checked
        self.ptq.on_guard_miss = {"tried": list(PTQ_ON_GUARD_MISS), "groups": [g.name for g in worst], "kept": kept}
        if not kept:
            self.ptq.drop()
            return uniform
        self.current = trial.build
        return checked

    def guard_speed(self) -> None:
        """The no-slowdown guarantee; sets what is delivered and why."""
        current, recipe = self.current, self.recipe
        if self.guard_failed:
            return
        if self.request.replay is not None and self.request.replay.delivered == "float":
            self.delivered, self.reason = "float", REPLAYED_FLOAT
            return
        if not current.quantized:
            left = current.insert.subgraph_compute_left_float
            self.delivered = "float"
            self.reason = "no node could be quantized" + (
                f" ({left} compute nodes inside If/Loop/Scan subgraphs were left float)" if left else "")
            return
        if not self.measure:
            self.reason = f"latency not measured: {self.why_not_measured}; the no-slowdown check did not run"
            return
        holds = (lambda trial: guard.checked(trial)["met"]) if self.guard_applies else None
        with self.reporter.stage("no-slowdown: measure float vs int8, return costly nodes to float"):
            best = run(no_slowdown(current, self.builder(self.candidates[self.chosen]), self.trials.kernel_times,
                                   self.float_path, recipe, holds), self.trials)
        if recipe.no_slowdown and best.ratio > recipe.max_ratio:  # before giving up int8: what pays beside the
            other = self._op_set_after_guard(current)               # guard's float groups may be another op set
            if other is not None and other.ratio < best.ratio:  # measured afresh by the rounds
                with self.reporter.stage("no-slowdown with that op set"):
                    best = run(no_slowdown(other.build, self.builder(self.candidates[self.chosen]),
                                           self.trials.kernel_times, self.float_path, recipe, holds), self.trials)
        self.current = current = best.build
        self.latency = best.latency
        ratio, bar = best.ratio, self._max_ratio(current)
        if not current.quantized:
            self.delivered, self.reason = "float", "every quantized node was slower in int8 than in float (measured)"
        elif recipe.no_slowdown and ratio > bar:
            self.delivered = "float"
            self.reason = (f"int8 was not faster than float on {self.target.name} (median ratio {ratio:.2f}, "
                           f"needs ≤ {bar}) even after returning costly nodes to float")
        with self.reporter.stage("profile per node"):
            owners = current.insert.owners
            for name, path in (("float", self.float_path), ("int8", current.path)):
                times = self.trials.kernel_times(path)
                self.profiles[name] = cost_by_node(times, owners)

    def _max_ratio(self, build: _Build) -> float:
        return self.recipe.max_ratio_for(folder_bytes(build.path.parent), folder_bytes(self.float_path.parent))

    def allocate_bits(self) -> None:
        """``--scheme mixed``: a precision per layer group from the mixed-precision search."""
        if not self.current.quantized:
            return self.guard_speed()  # nothing to allocate: says why float is delivered
        if self.request.replay is not None:
            return self._replay_mixed(self.request.replay)
        if self.recipe.latency_ms is not None and not self.measure:
            raise UserError(f"--latency-ms needs latency measured on the target ({self.why_not_measured})",
                            "drop --latency-ms, or compile on the device")
        build_with, tags = self.builder(self.candidates[self.chosen]), itertools.count(1)

        def build(precisions: dict[str, str]) -> _Build:
            return build_with(set(self.request.keep_float), f"mixed{next(tags)}", precisions)

        search = MixedPrecisionSearch(self.recipe, self.target, self.runtime, self.reporter, build, self.trials,
                                      self._sensitivity_cache(),
                                      self._gated_model)
        self.mixed = search(self.model, self.float_path, self.current, self.calib, self.ranges)
        chosen = self.mixed.chosen
        self.current, self.latency, self.delivered = chosen.build, chosen.latency, "mixed"
        self.reason = "groups by precision: " + ", ".join(
            f"{p} {n}" for p, n in precision_counts(chosen.assign).items())
        if not self.measure:
            self.reason += f"; latency not measured: {self.why_not_measured}"
        elif chosen.ms > chosen.latency["float"].median_ms and self._float_meets_budgets():
            self.delivered = "float"
            self.reason = (f"every mixed build measured slower than float (best ×{chosen.ms / self.mixed.float_ms:.2f})"
                           " and float meets the budgets")
        if self.measure:
            owners = self.current.insert.owners
            self.profiles = {"float": cost_by_node(self.mixed.float_times, owners),
                             "int8": chosen.node_ms}

    def _replay_mixed(self, decisions: Decisions) -> None:
        """A locked build: the recorded per-node precisions, built once; nothing measured."""
        if decisions.delivered == "float":
            self.delivered, self.reason = "float", REPLAYED_FLOAT
            return
        build_with = self.builder(self.candidates[self.chosen])
        self.current = build_with(set(self.request.keep_float), "replay", dict(decisions.precisions))
        self.delivered = "mixed"
        self.reason = "replayed from the lock: nodes by precision: " + ", ".join(
            f"{p} {n}" for p, n in precision_counts(decisions.precisions).items())

    def _float_meets_budgets(self) -> bool:
        """Float has no accuracy drop; it meets a size budget or a latency budget only by its own numbers."""
        recipe, mixed = self.recipe, self.mixed
        return ((recipe.size_mb is None or mixed.float_bytes <= recipe.size_mb * MB)
                and (recipe.latency_ms is None or mixed.float_ms <= recipe.latency_ms))

    def _sensitivity_cache(self) -> tuple[JsonCache, list] | None:
        """Sensitivities are cached beside the calibration ranges, keyed by everything they depend on."""
        if self.request.cache_dir is None:
            return None
        key = [self.normalized_digest, self.calib.digest, sorted(self.ranges.items()),
               self.candidates[self.chosen], self.target.quantization.__dict__, self.target.precisions.__dict__,
               self.recipe.sensitivity_feeds, self.recipe.sensitivity, sorted(self.request.keep_float),
               list(self.ptq.techniques), sorted(self.trials.hints.sets)]
        return self.calibrator.cache, key

    @property
    def has_int8(self) -> bool:
        return any(d.precision == "int8" for d in self.current.insert.decisions.values())

    @property
    def delivered_path(self) -> Path:
        return self.base_path if self.delivered == "float" else self.current.path

    @property
    def delivered_feeds(self) -> int | None:
        """Held-out feeds the delivered model is judged on: all (None), but when it is the float model itself
        (float delivered, not pruned), the first CHECK_FEEDS, which fill the manifest's table."""
        return CHECK_FEEDS if self.delivered_path == self.float_path else None

    def delivered_fidelity(self) -> dict:
        """The delivered model against float on the held-out feeds; an int8 build a trial already judged on
        every one (the no-slowdown round chosen under the guard) is not run again."""
        judged = self.trials.judged(self.current) if self.delivered != "float" else None
        return judged or self.trials.fidelity(self.delivered_path, self.delivered_feeds)

    def _returned_why(self, name: str, decision) -> str:
        """A decision's reason; for a node this compile returned to float, which measured choice did (a locked
        build replays them all as one list, and says so)."""
        if decision.quantized or name not in self.current.insert.keep_float or name in self.request.keep_float:
            return decision.reason
        return RETURNED_BY_GUARD if name in self.guard_float_nodes else RETURNED_SLOWER

    def manifest(self, fidelity: dict, budget: dict | None, delivered_bytes: int, float_bytes: int) -> dict:
        insert, latency = self.current.insert, self.latency
        return {
            "edgeq": "artifact/1",
            "tools": tool_versions(),
            "inputs": {"model": {"name": Path(self.request.model).name, "sha256": self.source_digest},
                       **self.data_info},
            "target": self.target.to_dict(),
            "recipe": {**self.recipe.to_dict(), "optional_ops": ",".join(self.candidates[self.chosen]) or "none",
                       "keep_float": sorted(insert.keep_float)},
            "normalize": self.normalize_check,
            "op_sets": {"chosen": self.chosen, "candidates": list(self.candidates)},
            "ptq": self.ptq.report(),
            "delivered": {"precision": self.delivered, "reason": self.reason, "file": MODEL,
                          "bytes": delivered_bytes, "float_bytes": float_bytes},
            "calibration": {"method": self.recipe.method, "tensors": len(self.calibrator.ranges),
                            "per_tensor": self.ranges_chosen,
                            "ranges": {name: list(r) for name, r in sorted(self.ranges.items())},
                            "seconds": self.calib_seconds, "cache_hit": self.calibrator.cache_hit,
                            "from_lock": self.calibrator.restored,
                            "nonfinite": self.calibrator.nonfinite, "subgraphs": self.calibrator.subgraphs,
                            "cache_problems": self.calibrator.cache.problems},
            "quantization": {
                "quantized_nodes": len(self.current.quantized),
                "float_nodes": sum(1 for d in insert.decisions.values() if not d.quantized),
                "subgraph_compute_left_float": insert.subgraph_compute_left_float,
                "decisions": {n: {"op_type": d.op_type, "quantized": d.quantized, "precision": d.precision,
                                  "reason": self._returned_why(n, d)}
                              for n, d in sorted(insert.decisions.items())},
            },
            "latency": ({k: v.to_dict() for k, v in latency.items()}
                        | {"ratio": latency["int8"].median_ms / latency["float"].median_ms,
                           "device": device_summary(self.device)}
                        if latency else {"measured": False, "why": self.why_not_measured}),
            "guard": (self.guard_report or {"thresholds": guard.THRESHOLDS}) if self.guard_applies
            else {"applied": False, "why": "--no-guard" if not self.recipe.guard else
                  "--metric/--max-drop given" if self.recipe.scheme == "int8" else "--scheme mixed has its budgets"},
            "search": self.trials.to_dict(),
            "per_node": _per_node_table(self.profiles, insert.decisions),
            "fidelity": fidelity,
            "budget": budget,
        }


@contextlib.contextmanager
def _measuring_device(request: CompileRequest):
    """The device a compile measures on (None with --no-measure), closed when the compile ends. A remote device
    the user named must match the target (one line, exit 2); this machine, when it does not, measures nothing
    and the manifest says why."""
    if not request.measure:
        yield None
        return
    device = open_device(request.target.measure_where)
    try:
        if not isinstance(device, LocalDevice):
            why = device.check(request.target)
            if why:
                raise UserError(f"device {device.address} cannot measure target {request.target.name}: {why}",
                                "run 'edgeq device check DEVICE -t TARGET', or choose the target that device is")
        yield device
    finally:
        device.close()


def _check_sparsity(model_path: Path) -> dict:
    """Every 2:4-annotated weight of the artifact obeys 2:4, or the compile fails: a broken pattern is a bug
    in a pass, never something to deliver."""
    check = check_model(model_path)
    if not check.ok:
        raise RuntimeError(f"2:4 pattern broken in the artifact: {check.violations[:3]}")
    return check.to_dict()


def _budget(recipe: Recipe, fidelity: dict, measured_ms: float | None, size: int,
            replayed: bool = False) -> tuple[dict | None, int]:
    """Each budget given, with what was measured; ``met`` when all hold (latency unmeasured counts as missed)."""
    budget, met = {}, []
    if recipe.max_drop is not None:
        budget |= {"max_drop": recipe.max_drop, "drop": accuracy_drop(fidelity)}
        met.append(budget["drop"] <= recipe.max_drop)
    if recipe.latency_ms is not None:
        budget |= {"latency_ms": recipe.latency_ms, "measured_ms": measured_ms}
        if replayed:  # a locked build measures nothing: its lock's measured build met or missed it
            budget["replayed"] = True
        else:
            met.append(measured_ms is not None and measured_ms <= recipe.latency_ms)
    if recipe.size_mb is not None:
        budget |= {"size_mb": recipe.size_mb, "bytes": size}
        met.append(size <= recipe.size_mb * MB)
    if not met:
        return None, EXIT_OK
    budget["met"] = all(met)
    return budget, EXIT_OK if budget["met"] else EXIT_BUDGET_MISSED


def _fresh_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _calibration_sets(request: CompileRequest, specs: list[InputSpec]):
    recipe = request.recipe
    if request.calib is None:
        if not recipe.allow_random_calibration:
            raise UserError("no calibration data given", "pass --calib PATH with real inputs "
                            "(or --random-calibration to accept synthetic data and its worse scales)")
        data = CalibrationData.random(specs, count=64, seed=recipe.seed)
    else:
        data = CalibrationData.from_path(request.calib, specs)
    if request.eval is not None:
        calib, holdout = data, CalibrationData.from_path(request.eval, specs)
    else:
        calib, holdout = data.split(recipe.holdout_fraction)
        if holdout is None:
            raise UserError(f"only {len(data)} calibration feed(s): nothing to hold back for checking",
                            "add feeds, or pass --eval PATH")
        if len(holdout) < MIN_HELD_OUT:  # too few to show a rare changed decision: judge on every feed
            info = {"calibration": calib.describe(), "eval": holdout.describe() | {
                "feeds": len(data), "held_out": len(holdout), "calibration_included": True}}
            return calib, data, info
    return calib, holdout, {"calibration": calib.describe(), "eval": holdout.describe()}


def _per_node_table(profiles: dict[str, dict[str, float]], decisions: dict) -> list[dict]:
    if not profiles:
        return []
    names = sorted(set(profiles["float"]) | set(profiles["int8"]),
                   key=lambda n: -(profiles["float"].get(n, 0.0) + profiles["int8"].get(n, 0.0)))
    return [{"node": n, "op_type": decisions[n].op_type if n in decisions else "",
             "quantized": bool(decisions[n].quantized) if n in decisions else False,
             "float_ms": profiles["float"].get(n, 0.0), "int8_ms": profiles["int8"].get(n, 0.0)} for n in names]
