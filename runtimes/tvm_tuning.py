"""MetaSchedule tuning of a model's kernels, with a database that persists across compiles.

Rules:
- Tasks are the fused functions of the lowered model (:func:`edgeq.runtimes.tvm.TvmRuntime.lower`).
- ``trials`` is the model's cumulative budget on a target: the database (one per TVM target, under the cache
  folder; records keyed by each task's structure, so models sharing a layer share its records) already holds
  some measured trials for these tasks; only the difference is tuned. A compile asking for no more trials than
  are recorded is a database hit and tunes nothing.
- Candidates are built in this process (:data:`BUILD_THREADS` at a time) and, locally, timed in it too; for
  ``rpc://HOST:PORT/KEY`` TVM's RPC runner times them on the boards, as many at once as the tracker lists
  free under the key when tuning starts (:func:`_builder_and_runner`).
- After tuning, the database is compacted to the best :data:`KEEP_RECORDS` records of each workload, and the
  trials each workload was given are counted in :data:`TRIALS_FILE` beside it.
- Every task gets a first round (tasks with the fewest records first) before the gradient task scheduler spends
  the rest where latency falls fastest; the round is sized so that first rounds take at most half the budget
  (but at least 8 candidates: the search costs about as much per round whatever its size).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq.devices.rpc import RpcDevice, rpc_address
from edgeq.runtimes.tvm import _tvm, tvm_target
from edgeq.target import Target

# Evolutionary search sized for a 2-core machine: with TVM's defaults (population 512, 50 random samples,
# 4 genetic iterations) mutation and sampling took most of the tuning time here, not building and running.
POPULATION = 64
RANDOM_SAMPLES = 24
GENETIC_ITERATIONS = 1
# Each candidate: one warm-up run, then one timed run. Timing took 38% of tuning time with three timed runs
# (slow candidates of a ResNet-18 conv take 0.1 s a run); one ranks kernels well enough, and the model is
# measured properly later.
RUNS_PER_CANDIDATE = 1
# After tuning, the database keeps the best records of each workload: a build needs the best, a later tuning
# seeds its search from the best few, and reading all of them took 7 s of a MobileNetV2 re-compile (907
# records). How many trials each workload was given is kept beside them, in TRIALS_FILE.
KEEP_RECORDS = 8
TRIALS_FILE = "trials.json"
# Candidates are compiled by LLVM in this many threads (TVM releases the GIL while it compiles).
BUILD_THREADS = 2


@dataclass
class TuningReport:
    trials_requested: int
    trials_in_database_before: int
    trials_run: int
    seconds: float
    tasks: int
    database: str
    runner: str
    boards: int  # boards timing candidates at once (1: this machine, or one board)

    @property
    def hit(self) -> bool:
        return self.trials_run == 0

    def to_dict(self) -> dict:
        return asdict(self) | {"database_hit": self.hit}


def _builder_and_runner(target: Target, boards: int):
    """A builder that builds candidates in this process, and the runner that times them (on a farm, on
    ``boards`` boards at once).

    TVM's LocalBuilder starts worker processes that import TVM afresh for every batch (on 2 cores that timed
    out on every candidate), and its LocalRunner exports, links and loads each candidate in another process.
    Locally, a built candidate stays in memory and is timed right here (candidates are verified before they run;
    a crash would end the compile, which an isolated runner avoids at about a second per candidate). For a
    board, candidates are exported and TVM's RPC runner uploads and times them there, one per board at once.
    """
    tvm = _tvm()
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import (LocalRunnerFuture, default_alloc_argument,
                                                            default_run_evaluator)

    def _build_one(item):
        try:
            return default_build(item.mod, item.target, None), None
        except tvm.TVMError as exc:
            return None, str(exc)[:2000]

    evaluator = ms.runner.EvaluatorConfig(number=RUNS_PER_CANDIDATE, repeat=1, min_repeat_ms=0,
                                          enable_cpu_cache_flush=False)
    device = rpc_address(target)
    built: dict[str, object] = {}

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            with ThreadPoolExecutor(BUILD_THREADS) as pool:
                outcomes = list(pool.map(_build_one, build_inputs))
            for item, (module, error) in zip(build_inputs, outcomes):
                if module is None:  # an invalid candidate: recorded as failed, the search goes on
                    results.append(BuilderResult(None, error))
                    continue
                if device is None:
                    key = f"in-process:{len(built)}:{id(module)}"
                    built[key] = module
                else:
                    key = default_export(module)
                results.append(BuilderResult(key, None))
            return results

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            for item in runner_inputs:
                module = built.pop(str(item.artifact_path))
                dev = tvm.runtime.device(str(item.device_type), 0)
                try:
                    args = default_alloc_argument(dev, tuple(a.as_json() for a in item.args_info), 1)
                    _zero_integer_arguments(args)
                    futures.append(LocalRunnerFuture(res=default_run_evaluator(module, dev, evaluator, args)))
                except tvm.TVMError as exc:
                    futures.append(LocalRunnerFuture(error_message=str(exc)[:2000]))
            return futures

    if device is None:
        return InProcessBuilder(), InProcessRunner()
    rpc = ms.runner.RPCConfig(tracker_host=device.host, tracker_port=device.port, tracker_key=device.key,
                              session_timeout_sec=120)
    return InProcessBuilder(), ms.runner.RPCRunner(rpc_config=rpc, evaluator_config=evaluator, max_workers=boards)


def _zero_integer_arguments(repeated_args) -> None:
    """Integer inputs of a candidate are indices (a gather's token ids): MetaSchedule fills them at random, and a
    kernel reading at a random index leaves its buffer and kills the process it runs in (this one, locally)."""
    for args in repeated_args:
        for arg in args:
            if "int" in str(arg.dtype):
                arg.copyfrom(np.zeros(tuple(arg.shape), str(arg.dtype)))


def database_dir(cache_dir: Path, target: Target) -> Path:
    """One database per TVM target: its records are only valid for the target they were measured on."""
    key = json.dumps([str(tvm_target(target)), str(rpc_address(target) or "local")])
    return Path(cache_dir) / "tvm" / f"{target.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def open_database(folder: Path):
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(folder))


def _register_intrinsics(tvm_target) -> None:
    """Register the tensor intrinsics MetaSchedule may use on this target. Importing TVM's ``tensor_intrin``
    package registers every family (CUDA's alone took 46 s here, on every compile), so for a CPU target an
    empty package stands in for it and only the target's family (x86 or arm_cpu) is imported."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        package = types.ModuleType(name)
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[name] = package
    families = ["cuda"] if tvm_target.kind.name == "cuda" else ["arm_cpu" if "arm_cpu" in tvm_target.keys else "x86"]
    for family in families:
        importlib.import_module(f"{name}.{family}")


def tasks_of(fused, tvm_target) -> list:
    """The tuning tasks of a fused module (functions TVM's default schedules have not already scheduled)."""
    from tvm.s_tir import meta_schedule as ms

    return [t for t in ms.relax_integration.extract_tasks(fused, tvm_target)
            if not t.mod.attrs.get("tirx.is_scheduled", False)]


def _records(database, mod) -> int:
    """Valid records the database holds for a task."""
    return len(database.get_top_k(database.commit_workload(mod), 1 << 20)) if database.has_workload(mod) else 0


def _workload_key(mod) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def _trial_counts(folder: Path) -> dict[str, int]:
    path = Path(folder) / TRIALS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _trials_by_task(database, tasks, folder: Path) -> list[int]:
    """Measured trials each task was given (counted in ``folder``'s trial file, so records a compaction dropped
    still count), or the records the database holds for a task the file does not name."""
    counts = _trial_counts(folder)
    keys = [_workload_key(t.dispatched[0]) for t in tasks]
    return [counts[k] if k in counts else _records(database, t.dispatched[0]) for k, t in zip(keys, tasks)]


def recorded_trials(database, tasks, folder: Path) -> int:
    """Measured trials these tasks were given, in all."""
    return sum(_trials_by_task(database, tasks, folder))


def _compact(database, folder: Path, tasks, kept_before: dict[str, int]) -> None:
    """Count the trials the tasks were given, then rewrite the database with the best :data:`KEEP_RECORDS`
    records of each workload (written beside it, then moved into place)."""
    from tvm.s_tir import meta_schedule as ms

    counts = _trial_counts(folder)
    for task in tasks:
        key, mod = _workload_key(task.dispatched[0]), task.dispatched[0]
        counts[key] = counts.get(key, kept_before[key]) + _records(database, mod) - kept_before[key]
    by_workload: dict[str, list] = {}
    for record in database.get_all_tuning_records():
        by_workload.setdefault(_workload_key(record.workload.mod), []).append(record)
    fresh = Path(folder) / ".compacting"
    shutil.rmtree(fresh, ignore_errors=True)
    compact = open_database(fresh)
    for records in by_workload.values():
        valid = sorted((r for r in records if r.run_secs), key=lambda r: sum(float(x) for x in r.run_secs))
        workload = compact.commit_workload(records[0].workload.mod)
        for r in valid[:KEEP_RECORDS]:
            compact.commit_tuning_record(ms.database.TuningRecord(r.trace, workload, r.run_secs, r.target,
                                                                  r.args_info))
    for name in ("database_workload.json", "database_tuning_record.json"):
        os.replace(fresh / name, Path(folder) / name)
    shutil.rmtree(fresh)
    (Path(folder) / TRIALS_FILE).write_text(json.dumps(counts, indent=1, sort_keys=True))


def tune(fused, target: Target, trials: int, database, folder: Path, on_progress=None) -> TuningReport:
    """Tune the tasks of ``fused`` until ``database`` (opened from ``folder``, where the logs go too) holds
    ``trials`` measured trials for them."""
    from tvm.s_tir import meta_schedule as ms

    compiled_for = tvm_target(target)
    # TVM's task scheduler gives tasks their first round in list order, and every call starts afresh: the tasks
    # with the fewest records go first, so that a budget spent over several calls reaches every task.
    found = tasks_of(fused, compiled_for)
    counted = sorted(zip(_trials_by_task(database, found, folder), (-t.weight for t in found), range(len(found)),
                         found), key=lambda c: c[:3])
    tasks = [c[3] for c in counted]
    kept_before = {_workload_key(t.dispatched[0]): _records(database, t.dispatched[0]) for t in tasks}
    _register_intrinsics(compiled_for)
    before = sum(c[0] for c in counted)
    budget = max(0, trials - before)
    device = rpc_address(target)
    boards = max(1, RpcDevice(str(device)).free_boards()) if device is not None and budget else 1
    started = time.perf_counter()
    if budget and tasks:
        _quiet_tvm_logs()
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(folder), num_threads=2, seed=0, strategy=ms.search_strategy.EvolutionarySearch(
                population_size=POPULATION, init_min_unmeasured=RANDOM_SAMPLES, genetic_num_iters=GENETIC_ITERATIONS))
        per_round = max(8, min(64, budget // (2 * len(tasks))))
        builder, runner = _builder_and_runner(target, boards)
        callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel()]
        if device is not None:  # candidates were exported to temporary folders
            callbacks.append(ms.measure_callback.RemoveBuildArtifact())
        if on_progress is not None:
            callbacks = [*callbacks, _progress_callback(budget, on_progress)]
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(folder), max_trials_global=budget,
                      num_trials_per_iter=per_round, builder=builder, runner=runner, database=database,
                      measure_callbacks=callbacks)
        _compact(database, folder, tasks, kept_before)
    return TuningReport(trials, before, recorded_trials(database, tasks, folder) - before,
                        time.perf_counter() - started, len(tasks), str(folder), str(device or "local"), boards)


def _progress_callback(budget: int, on_progress):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(runner_results)
            on_progress(min(self.done, budget), budget)

    return Progress()


def _quiet_tvm_logs() -> None:
    """MetaSchedule logs every round to the console; edgeq shows its own progress instead (its per-task logs still
    go to files in the database folder). Its handlers are dropped before each tuning: MetaSchedule sets them up
    afresh, and its setup fails on a handler it did not name (test runners attach such handlers)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.handlers.clear()
    logger.setLevel(logging.WARNING)
