"""The local device: this machine, measured in this process by the same agent a remote board runs."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Mapping

import numpy as np

from edgeq import scratch
from edgeq.devices.agent import Agent, Loaded, facts
from edgeq.devices.base import latencies, why_not
from edgeq.runtimes.base import Latency
from edgeq.target import Target


class LocalDevice:
    address = "local"

    def __init__(self):
        self.agent = Agent()

    @cached_property
    def _facts(self) -> dict:
        return facts()

    def facts(self) -> dict:
        return self._facts

    def check(self, target: Target, runtime: str = "onnxruntime") -> str:
        why = why_not(self._facts, target, runtime)
        if why or runtime != "tvm":
            return why
        from edgeq.runtimes.tvm import device_present  # imports TVM: only TVM's check needs it

        return device_present(target)[1]

    def measure(self, models: Mapping[str, Path], feed: Mapping[str, np.ndarray], settings: dict, warmup: int,
                repeats: int, noise: dict) -> dict[str, Latency]:
        self.agent.pin = noise.get("pin")
        answer = self.agent.measure({name: str(path) for name, path in models.items()}, dict(feed), settings, warmup,
                                    repeats, noise)
        return latencies(answer, self.address)

    def profile(self, model: Path, feed: Mapping[str, np.ndarray], settings: dict, runs: int,
                seconds: float) -> tuple[list[tuple[str, str, float]], int]:
        with scratch.scratch_dir("profile") as folder:  # never beside the model: its folder may be read-only
            answer = self.agent.profile(str(model), dict(feed), settings, runs, seconds, str(folder))
        return [tuple(k) for k in answer["kernels"]], answer["runs"]

    def session(self, model: Path, settings: dict, optimized: bool = True) -> Loaded:
        return self.agent.session(str(model), settings, optimized)

    def close(self) -> None:
        pass
