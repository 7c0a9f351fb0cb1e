"""The Runtime protocol and the latency protocol every runtime shares.

Latency rule: candidates are compared inside one process, interleaved, on the same feed. After ``warmup``
runs each, every round runs each candidate once, in an order that alternates between rounds so neither
always runs first; per-run wall times give min, median and p90. There are ``repeats`` rounds, more for fast
models — as many as fill :data:`MIN_SECONDS` per candidate (at most :data:`MAX_ROUNDS`): 50 runs of a
sub-millisecond model are noise — and fewer for slow ones: no more than fill :data:`MAX_SECONDS` per candidate,
but at least :data:`MIN_ROUNDS` (a one-second model's runs each average over its own jitter; 50 of them would
cost minutes per comparison). Warm-up stops early past :data:`MAX_SECONDS`. Only ratios from one such run are
meaningful on a shared machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np


@dataclass(frozen=True)
class Latency:
    min_ms: float
    median_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def from_samples(cls, seconds: list[float]) -> "Latency":
        ms = np.asarray(seconds) * 1e3
        return cls(float(ms.min()), float(np.median(ms)), float(np.percentile(ms, 90)), len(ms))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NodeTime:
    """Average time per run spent in one node of the *original* graph (fused kernels mapped back)."""

    name: str
    op_type: str
    ms: float


def cost_by_node(times: list[NodeTime], owners: dict[str, str]) -> dict[str, float]:
    """Kernel time per original node: Q/DQ kernels and fused activations count for the node they serve."""
    cost: dict[str, float] = {}
    for t in times:
        owner = owners.get(t.name, t.name)
        cost[owner] = cost.get(owner, 0.0) + t.ms
    return cost


class Session(Protocol):
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class Runtime(Protocol):
    name: str

    def build(self, model_path: Path, out_dir: Path) -> Path:
        """Turn a model into what the target loads, inside ``out_dir``; returns the main file."""
        ...

    def session(self, model_path: Path) -> Session: ...

    def measure(self, models: Mapping[str, Path], feeds: Mapping[str, np.ndarray], warmup: int,
                repeats: int) -> dict[str, Latency]:
        """Latency of each model by :func:`measure_interleaved`."""
        ...

    def profile(self, model_path: Path, feeds: Mapping[str, np.ndarray], runs: int) -> list[NodeTime]: ...


MIN_SECONDS = 0.5
MAX_SECONDS = 10.0
MIN_ROUNDS = 7
MAX_ROUNDS = 5000


def measure_interleaved(runners: Mapping[str, Callable[[], object]], warmup: int = 5,
                        repeats: int = 50) -> dict[str, Latency]:
    names = list(runners)
    started, warmed = time.perf_counter(), 0
    while warmed < max(warmup, 1) and (not warmed or time.perf_counter() - started < MAX_SECONDS):
        for name in names:
            runners[name]()
        warmed += 1
    per_round = max((time.perf_counter() - started) / warmed, 1e-9)
    repeats = max(repeats, min(MAX_ROUNDS, int(MIN_SECONDS * len(names) / per_round)))
    repeats = min(repeats, max(MIN_ROUNDS, int(MAX_SECONDS * len(names) / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Latency.from_samples(s) for name, s in samples.items()}
