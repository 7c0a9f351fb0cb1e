"""Trials: the one place a compile builds a candidate, measures it, and records what it measured.

Every measured choice of a compile — which optional op set, which nodes return to float for speed, which
layer groups the fidelity guard keeps int8, which layers the 2:4 stage prunes, which precision each group takes
— is a *strategy*: a generator that proposes :class:`Candidate` builds one at a time and sees each one's
:class:`Trial` before it proposes the next (bisection, revert rounds) or chooses (:func:`run` drives it).

Rules:
- A candidate says how it is built (``make``) and what to measure: latency interleaved with the float model on
  the target's runtime settings (``time``; only where the target can be measured here), fidelity against the
  float model on the held-out feeds (``feeds``: all, the first n, or 0 for none), per-node kernel times
  (``profile``).
- Every trial is recorded in order, with its strategy, label, facts and figures; the strategy marks the one it
  chooses. :meth:`Trials.to_dict` is the manifest's ``search``.
- The float model runs on each held-out feed once, as far into them as a trial asks: its outputs are kept (up
  to ``REFERENCE_BYTES``; beyond that float runs beside each trial) and every trial is compared against them.
- A strategy bounds itself (rounds, ⌈log₂(n + 1)⌉ bisection steps, one build per op set); :func:`run` measures
  each candidate exactly once.
- A strategy may propose a batch (a list of candidates that do not depend on each other's figures): all are
  built, then their latency pairs are measured together — in parallel where the device has several boards
  (:meth:`edgeq.devices.rpc.RpcDevice.measure_many`) — and the list of trials is sent back.
- The wall time spent measuring latency is summed (``measure_seconds``, the manifest's ``search``): what more
  boards under one key shorten.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgeq.fidelity import OutputHints, accuracy_drop, compare_models, reference_outputs, worst_sqnr
from edgeq.runtimes.base import NodeTime

R = TypeVar("R")
REFERENCE_BYTES = 256 << 20  # the float model's held-out outputs are kept, to compare every trial against, up to this


@dataclass(frozen=True)
class Built:
    """The least a build is: its model file."""

    path: Path


@dataclass
class Candidate:
    strategy: str  # the choice it serves: "op set", "no-slowdown", "guard", "2:4", "mixed"
    label: str  # what differs from its siblings
    make: Callable[[], Any]  # builds it: an object with ``path``, the model file
    time: bool = False
    feeds: int | None = 0  # held-out feeds for fidelity: None all, 0 none
    profile: bool = False
    facts: dict = field(default_factory=dict)


@dataclass
class Trial:
    candidate: Candidate
    build: Any
    latency: dict | None = None  # "float" and "int8" (the candidate) → Latency
    fidelity: dict | None = None
    kernel_times: list[NodeTime] | None = None
    chosen: bool = False

    @property
    def ratio(self) -> float | None:
        return self.latency["int8"].median_ms / self.latency["float"].median_ms if self.latency else None

    def to_dict(self) -> dict:
        record = {"strategy": self.candidate.strategy, "label": self.candidate.label, **self.candidate.facts}
        if self.latency:
            record |= {"float_ms": self.latency["float"].median_ms, "ms": self.latency["int8"].median_ms,
                       "ratio": self.ratio}
            conditions = self.latency["int8"].conditions
            if conditions:  # which board measured it, and whether the noise rule flagged the run
                record |= {"board": conditions.get("board"), "flags": conditions["flags"]}
        if self.fidelity:
            record |= {"sqnr_db": worst_sqnr(self.fidelity), "drop": accuracy_drop(self.fidelity)}
        return record | {"chosen": self.chosen}


class Trials:
    """Builds and measures candidates against one float model; keeps every trial."""

    def __init__(self, runtime, float_path: Path, feed: dict, holdout, recipe, metric=None, timed: bool = True):
        self.runtime, self.float_path, self.feed, self.holdout = runtime, float_path, feed, holdout
        self.recipe, self.metric, self.timed = recipe, metric, timed
        self.log: list[Trial] = []
        self.measure_seconds = 0.0
        self._kernels: dict[Path, list[NodeTime]] = {}
        self._reference: list | None = []  # float's outputs on the first held-out feeds; None: too big to keep
        self.hints = OutputHints.of(float_path)  # how the float model's outputs are read

    def measure(self, candidate: Candidate) -> Trial:
        return self.measure_batch([candidate])[0]

    def measure_batch(self, candidates: list[Candidate]) -> list[Trial]:
        batch = [Trial(candidate, candidate.make()) for candidate in candidates]
        timed = [trial for trial in batch if trial.candidate.time and self.timed]
        if timed:
            pairs = [{"float": self.float_path, "int8": trial.build.path} for trial in timed]
            started = time.perf_counter()
            latencies = self.runtime.measure_many(pairs, self.feed, self.recipe.latency_warmup,
                                                  self.recipe.latency_repeats)
            self.measure_seconds += time.perf_counter() - started
            for trial, latency in zip(timed, latencies):
                trial.latency = latency
        for trial in batch:
            if trial.candidate.feeds != 0:
                trial.fidelity = self.fidelity(trial.build.path, trial.candidate.feeds)
            if trial.candidate.profile and self.timed:
                trial.kernel_times = self.kernel_times(trial.build.path)
        self.log.extend(batch)
        return batch

    def fidelity(self, path: Path, feeds: int | None = None) -> dict:
        """How far a model file's outputs are from float's on the first ``feeds`` held-out feeds (None: all)."""
        wanted = len(self.holdout) if feeds is None else min(feeds, len(self.holdout))
        if self._reference is not None and len(self._reference) < wanted:
            kept = sum(np.asarray(o).nbytes for outputs in self._reference for o in outputs)
            more = reference_outputs(self.runtime, self.float_path,
                                     itertools.islice(iter(self.holdout), len(self._reference), wanted),
                                     REFERENCE_BYTES - kept)
            self._reference = None if more is None else self._reference + more
        return compare_models(self.runtime, self.float_path, path, self.holdout, self.metric, limit=feeds,
                              reference=self._reference, hints=self.hints)

    def judged(self, build) -> dict | None:
        """The fidelity a trial of this very build measured on every held-out feed, if one did (a copy)."""
        return next((dict(t.fidelity) for t in reversed(self.log)
                     if t.build is build and t.candidate.feeds is None and t.fidelity is not None), None)

    def kernel_times(self, path: Path) -> list[NodeTime]:
        """Per-node kernel times of one model file on the target's runtime settings (profiled once)."""
        if path not in self._kernels:
            self._kernels[path] = self.runtime.profile(path, self.feed)
        return self._kernels[path]

    def of(self, strategy: str) -> list[Trial]:
        return [t for t in self.log if t.candidate.strategy == strategy]

    def to_dict(self) -> dict:
        """The manifest's ``search``: every trial, and the wall time their latency measurement took."""
        return {"trials": [t.to_dict() for t in self.log], "measure_seconds": round(self.measure_seconds, 3)}


def run(strategy: Generator[Candidate | list[Candidate], Trial | list[Trial], R], trials: Trials) -> R:
    """Drive ``strategy``: each candidate (or batch) it proposes is built and measured once, recorded, and sent
    back; returns what the strategy returns."""
    try:
        proposed = next(strategy)
        while True:
            proposed = strategy.send(trials.measure_batch(proposed) if isinstance(proposed, list)
                                     else trials.measure(proposed))
    except StopIteration as finished:
        return finished.value
