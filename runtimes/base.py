"""The Runtime protocol, and latency records as every runtime reports them.

The latency and noise protocols themselves are :mod:`edgeq.devices.agent`'s: one implementation, run on
whichever device measures (this process, a board over ssh, a board behind a tracker).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np

from edgeq.devices.agent import interleaved, measured, stats


@dataclass(frozen=True)
class Latency:
    min_ms: float
    median_ms: float
    p90_ms: float
    runs: int
    conditions: dict | None = None  # where and how it was measured (edgeq.devices.agent's noise rule)

    @classmethod
    def from_samples(cls, seconds: list[float]) -> "Latency":
        return cls(**stats(seconds))

    def to_dict(self) -> dict:
        record = asdict(self)
        return record if self.conditions is not None else {k: v for k, v in record.items() if k != "conditions"}


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
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class Runtime(Protocol):
    name: str

    def build(self, model_path: Path, out_dir: Path) -> Path:
        """Turn a model into what the target loads, inside ``out_dir``; returns the main file."""
        ...

    def session(self, model_path: Path) -> Session: ...

    def measure(self, models: Mapping[str, Path], feeds: Mapping[str, np.ndarray], warmup: int,
                repeats: int) -> dict[str, Latency]:
        """Latency of each model, interleaved (the agent's latency rule, on the target's device)."""
        ...

    def measure_many(self, jobs: list[Mapping[str, Path]], feeds: Mapping[str, np.ndarray], warmup: int,
                     repeats: int) -> list[dict[str, Latency]]:
        """Each job as :meth:`measure` does, in parallel where the device can."""
        ...

    def profile(self, model_path: Path, feeds: Mapping[str, np.ndarray], runs: int) -> list[NodeTime]: ...


def measure_interleaved(runners: Mapping[str, Callable[[], object]], warmup: int = 5, repeats: int = 50,
                        here: bool = True) -> dict[str, Latency]:
    """Latency of each runner by the agent's latency rule; runners that run on this machine (``here``) by its
    noise rule too, their conditions recorded (a board's runners are timed from here: its conditions are its own)."""
    if not here:
        return {name: Latency.from_samples(s) for name, s in interleaved(dict(runners), warmup, repeats).items()}
    latency, record = measured(dict(runners), warmup, repeats)
    return {name: Latency(**s, conditions=record | {"device": "local"}) for name, s in latency.items()}
