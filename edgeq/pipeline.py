"""The compile pipeline: float ONNX in, a measured int8 (or, when int8 does not pay, float) artifact out.

    load → normalize → exclude → calibrate → insert QDQ → build → fidelity + latency
         → no-slowdown feedback (return costly nodes to float, rebuild; bounded) → artifact

Rules:
- Fidelity is measured on feeds held back from calibration (or the ``--eval`` set).
- Latency is float vs int8 in one process, interleaved, on the target's runtime settings.
- Requant op set (``recipe.requant_ops``): whether quantizing Add, Mul, Concat, Sigmoid, … pays depends on
  the model and its kernels (quantized residual Adds pay in CNNs and cost in transformers; a broadcast
  QLinearMul can cost more than the float Mul it replaces). ``auto`` builds candidates — all requant ops,
  none, and all but one op type at a time — measures their latency (interleaved with float) and SQNR, and
  keeps the most accurate of those within 5% of the fastest.
- int8 is delivered only when its median latency is at most ``recipe.max_ratio`` (0.97) of float's: a gain
  inside measurement noise does not pay for the accuracy int8 costs.
- No-slowdown: when int8's median latency is not below float's, per-node profiles of both builds are compared;
  every quantized node whose int8 kernels (its Q/DQ included) cost more than its float kernels returns to
  float (nodes ORT renamed in one build and so cannot be compared are left as they are), and the model is
  rebuilt, at most ``recipe.max_revert_rounds`` times. If int8 is still not faster,
  the float model is delivered and the manifest says why. Without a reachable device nothing is measured,
  and the manifest says that instead.
- The budget (``recipe.max_drop``) decides the exit code: 3 when missed, with the artifact still written.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import ContextManager, Protocol

import numpy as np
import onnx_ir as ir

from edgeq.artifact import MODEL, ArtifactWriter
from edgeq.calibration_data import CalibrationData, InputSpec
from edgeq.errors import EXIT_BUDGET_MISSED, EXIT_OK, UserError
from edgeq.fidelity import FidelityMeter, accuracy_drop, load_metric
from edgeq.model_io import load_model, model_digest, save_model
from edgeq.passes.calibrate import CalibratePass
from edgeq.passes.exclude import ExcludePass
from edgeq.passes.insert_qdq import InsertQDQPass
from edgeq.passes.normalize import NormalizePass
from edgeq.recipe import Recipe
from edgeq.runtimes.base import NodeTime, measure_interleaved
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import Target


# Variants whose latency is within this fraction of the fastest count as equally fast; the more accurate wins.
VARIANT_SPEED_TOLERANCE = 0.05
VARIANT_FIDELITY_FEEDS = 16


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


@dataclass
class _Build:
    path: Path
    insert: InsertQDQPass

    @property
    def quantized(self) -> list[str]:
        return sorted(n for n, d in self.insert.decisions.items() if d.quantized)


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) else None for d in (value.shape or ()))
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def tool_versions() -> dict[str, str]:
    names = ("edgeq", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy")
    versions = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def cost_by_node(times: list[NodeTime], owners: dict[str, str]) -> dict[str, float]:
    """Kernel time per original node: Q/DQ kernels and fused activations count for the node they serve."""
    cost: dict[str, float] = {}
    for t in times:
        owner = owners.get(t.name, t.name)
        cost[owner] = cost.get(owner, 0.0) + t.ms
    return cost


def compile_model(request: CompileRequest, reporter: Reporter | None = None) -> tuple[dict, int]:
    """Run the whole pipeline and publish the artifact; returns (manifest, exit code)."""
    reporter = reporter or SilentReporter()
    recipe, target = request.recipe, request.target
    metric = load_metric(request.metric) if request.metric else None
    with ArtifactWriter(request.out_dir) as writer, tempfile.TemporaryDirectory(prefix="edgeq-") as work:
        work = Path(work)
        with reporter.stage("load + normalize"):
            model = load_model(request.model)
            source_digest = model_digest(model)
            NormalizePass()(model)
            specs = input_specs(model)
            float_path = save_model(model, _fresh_dir(work / "float") / MODEL)
            normalized_digest = model_digest(model)

        calib, holdout, data_info = _calibration_sets(request, specs)
        rules = target.quantization
        excluder = ExcludePass(recipe.exclude)
        excluder(model)
        op_types = set(rules.compute_ops + rules.requant_ops + rules.passthrough_ops + rules.activation_fusions)
        calibrator = CalibratePass(calib, op_types, recipe.method, recipe.percentile, normalized_digest,
                                   request.cache_dir, on_progress=reporter.progress)
        with reporter.stage(f"calibrate ({recipe.method}, {len(calib)} feeds)"):
            started = time.perf_counter()
            calibrator(model)
            calib_seconds = time.perf_counter() - started

        def build_variant(requant_ops: tuple[str, ...]):
            variant_rules = replace(rules, requant_ops=requant_ops)

            def build(keep_float: set[str], tag: str) -> _Build:
                candidate = model.clone()
                insert = InsertQDQPass(variant_rules, calibrator.ranges, keep_float)
                insert(candidate)
                folder = _fresh_dir(work / f"int8-{'-'.join(requant_ops) or 'none'}-{tag}")
                return _Build(save_model(candidate, folder / MODEL), insert)
            return build

        runtime = OnnxRuntime(target)
        can_measure, why_not = target.can_measure_here()
        measure = request.measure and can_measure
        feed = next(iter(holdout)).inputs
        with reporter.stage("insert QDQ"):
            candidates = requant_candidates(recipe.requant_ops, rules.requant_ops, {n.op_type for n in model.graph})
            builds = {label: build_variant(ops)(set(request.keep_float), "0") for label, ops in candidates.items()}
        variants = {}
        if len(builds) > 1 and measure:
            with reporter.stage(f"measure variants ({', '.join(builds)})"):
                variants = _measure_variants(runtime, float_path, builds, feed, recipe, holdout)
            chosen = _choose_variant(variants)
        else:
            chosen = next(iter(builds))
        current, build = builds[chosen], build_variant(candidates[chosen])
        rounds: list[dict] = []
        delivered, reason = "int8", ""
        latency = None
        profiles: dict[str, dict[str, float]] = {}
        if not current.quantized:
            delivered = "float"
            reason = "no node could be quantized" + (
                f" ({current.insert.subgraph_compute_left_float} compute nodes inside If/Loop/Scan subgraphs "
                "were left float)" if current.insert.subgraph_compute_left_float else "")
        elif measure:
            current, latency, rounds = _no_slowdown(runtime, float_path, current, build, feed, recipe, reporter)
            ratio = latency["int8"].median_ms / latency["float"].median_ms
            if not current.quantized:
                delivered, reason = "float", "every quantized node was slower in int8 than in float (measured)"
            elif recipe.no_slowdown and ratio > recipe.max_ratio:
                delivered = "float"
                reason = (f"int8 was not faster than float on {target.name} (median ratio {ratio:.2f}, "
                          f"needs ≤ {recipe.max_ratio}) even after returning costly nodes to float")
            with reporter.stage("profile per node"):
                owners = current.insert.owners
                profiles["float"] = cost_by_node(runtime.profile(float_path, feed), owners)
                profiles["int8"] = cost_by_node(runtime.profile(current.path, feed), owners)
        else:
            reason = f"latency not measured: {why_not or 'disabled'}; the no-slowdown check did not run"

        delivered_path = current.path if delivered == "int8" else float_path
        with reporter.stage(f"fidelity on {len(holdout)} held-out feeds"):
            fidelity = _fidelity(runtime, float_path, delivered_path, holdout, metric)

        drop = accuracy_drop(fidelity)
        budget = None
        exit_code = EXIT_OK
        if recipe.max_drop is not None:
            budget = {"max_drop": recipe.max_drop, "drop": drop, "met": drop <= recipe.max_drop}
            exit_code = EXIT_OK if budget["met"] else EXIT_BUDGET_MISSED

        float_bytes = _folder_bytes(float_path.parent)
        for part in delivered_path.parent.iterdir():  # model.onnx, and its external data file if large
            os.replace(part, writer.path(part.name))
        manifest = {
            "edgeq": "artifact/1",
            "tools": tool_versions(),
            "inputs": {
                "model": {"name": Path(request.model).name, "sha256": source_digest},
                "calibration": data_info["calibration"],
                "eval": data_info["eval"],
            },
            "target": target.to_dict(),
            "recipe": {**recipe.to_dict(), "requant_ops": ",".join(candidates[chosen]) or "none",
                       "keep_float": sorted(current.insert.keep_float)},
            "requant_variants": {"chosen": chosen, "measured": variants},
            "delivered": {"precision": delivered, "reason": reason, "file": MODEL,
                          "bytes": _folder_bytes(writer.tmp),
                          "float_bytes": float_bytes},
            "calibration": {"method": recipe.method, "tensors": len(calibrator.ranges),
                            "seconds": calib_seconds, "cache_hit": calibrator.cache_hit},
            "quantization": {
                "quantized_nodes": len(current.quantized),
                "float_nodes": sum(1 for d in current.insert.decisions.values() if not d.quantized),
                "subgraph_compute_left_float": current.insert.subgraph_compute_left_float,
                "decisions": {n: {"op_type": d.op_type, "quantized": d.quantized, "reason": d.reason}
                              for n, d in sorted(current.insert.decisions.items())},
            },
            "latency": ({k: v.to_dict() for k, v in latency.items()} | {"ratio": latency["int8"].median_ms / latency["float"].median_ms}
                        if latency else {"measured": False, "why": why_not or "disabled"}),
            "no_slowdown_rounds": rounds,
            "per_node": _per_node_table(profiles, current.insert.decisions),
            "fidelity": fidelity,
            "budget": budget,
        }
        writer.publish(manifest)
    return manifest, exit_code


def _fresh_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _no_slowdown(runtime, float_path: Path, current: _Build, build, feed: dict, recipe: Recipe, reporter):
    """Measure; while int8 is not faster, return the nodes whose int8 kernels cost more to float and rebuild."""
    keep = set(current.insert.keep_float)
    rounds: list[dict] = []
    for round_index in range(recipe.max_revert_rounds + 1):
        with reporter.stage(f"measure float vs int8 (round {round_index + 1})"):
            latency = _measure_pair(runtime, float_path, current.path, feed, recipe)
        ratio = latency["int8"].median_ms / latency["float"].median_ms
        record = {"round": round_index, "quantized_nodes": len(current.quantized),
                  "float_ms": latency["float"].median_ms, "int8_ms": latency["int8"].median_ms, "ratio": ratio}
        rounds.append(record)
        if ratio <= recipe.max_ratio or not recipe.no_slowdown or round_index == recipe.max_revert_rounds:
            break
        with reporter.stage("profile per node"):
            owners = current.insert.owners
            float_cost = cost_by_node(runtime.profile(float_path, feed), owners)
            int8_cost = cost_by_node(runtime.profile(current.path, feed), owners)
        # Only nodes timed in both builds are judged: ORT renames some fused float kernels, and a node
        # with no float time says nothing about its cost.
        costly = sorted(n for n in current.quantized if n in float_cost and int8_cost.get(n, 0.0) > float_cost[n])
        record["returned_to_float"] = costly
        if not costly:
            break
        keep |= set(costly)
        with reporter.stage(f"rebuild with {len(costly)} costly nodes in float"):
            current = build(keep, str(round_index + 1))
        if not current.quantized:
            break
    return current, latency, rounds


def requant_candidates(spec: str, available: tuple[str, ...], present: set[str]) -> dict[str, tuple[str, ...]]:
    """Requant op sets to build, by label. ``auto``: all present, none, and all but each op type in turn."""
    if spec == "all":
        return {"all": available}
    if spec == "none":
        return {"none": ()}
    if spec != "auto":
        chosen = tuple(op.strip() for op in spec.split(",") if op.strip())
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise UserError(f"--requant-ops names ops the target has no integer kernel for: {', '.join(unknown)}",
                            f"choose from {', '.join(available)}, or use auto, all or none")
        return {",".join(chosen): chosen}
    used = tuple(op for op in available if op in present)
    if not used:
        return {"none": ()}
    candidates = {"all": used, "none": ()}
    if len(used) > 1:
        candidates |= {f"all but {op}": tuple(o for o in used if o != op) for op in used}
    return candidates


def _measure_variants(runtime, float_path: Path, builds: dict[str, _Build], feed: dict, recipe: Recipe,
                      holdout: CalibrationData) -> dict[str, dict]:
    """Each variant's int8/float median latency ratio (all interleaved with float) and worst-output SQNR."""
    sessions = {"float": runtime.session(float_path)} | {k: runtime.session(b.path) for k, b in builds.items()}
    latency = measure_interleaved({k: (lambda s=s: s.run(feed)) for k, s in sessions.items()},
                                  warmup=recipe.latency_warmup, repeats=recipe.latency_repeats)
    result = {}
    for name in builds:
        meter = FidelityMeter(sessions["float"].output_names)
        for index, f in enumerate(holdout):
            if index == VARIANT_FIDELITY_FEEDS:
                break
            meter.update(sessions["float"].run(f.inputs), sessions[name].run(f.inputs))
        outputs = meter.summary()["outputs"].values()
        result[name] = {"ratio": latency[name].median_ms / latency["float"].median_ms,
                        "sqnr_db": min((o["sqnr_db"] for o in outputs), default=float("inf"))}
    return result


def _choose_variant(variants: dict[str, dict]) -> str:
    """The most accurate variant among those within VARIANT_SPEED_TOLERANCE of the fastest."""
    fastest = min(v["ratio"] for v in variants.values())
    close = [k for k, v in variants.items() if v["ratio"] <= fastest * (1 + VARIANT_SPEED_TOLERANCE)]
    return max(close, key=lambda k: variants[k]["sqnr_db"])


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
    info = {"calibration": calib.describe(), "eval": holdout.describe()}
    return calib, holdout, info


def _measure_pair(runtime: OnnxRuntime, float_path: Path, int8_path: Path, feed: dict, recipe: Recipe):
    sessions = {"float": runtime.session(float_path), "int8": runtime.session(int8_path)}
    return measure_interleaved({k: (lambda s=s: s.run(feed)) for k, s in sessions.items()},
                               warmup=recipe.latency_warmup, repeats=recipe.latency_repeats)


def _fidelity(runtime: OnnxRuntime, ref_path: Path, test_path: Path, holdout: CalibrationData, metric) -> dict:
    ref, test = runtime.session(ref_path), runtime.session(test_path)
    meter = FidelityMeter(ref.output_names, keep_for_metric=metric is not None)
    for feed in holdout:
        meter.update(ref.run(feed.inputs), test.run(feed.inputs), feed)
    return meter.summary(metric)


def _per_node_table(profiles: dict[str, dict[str, float]], decisions: dict) -> list[dict]:
    if not profiles:
        return []
    names = sorted(set(profiles["float"]) | set(profiles["int8"]),
                   key=lambda n: -(profiles["float"].get(n, 0.0) + profiles["int8"].get(n, 0.0)))
    return [{"node": n, "op_type": decisions[n].op_type if n in decisions else "",
             "quantized": bool(decisions[n].quantized) if n in decisions else False,
             "float_ms": profiles["float"].get(n, 0.0), "int8_ms": profiles["int8"].get(n, 0.0)} for n in names]
