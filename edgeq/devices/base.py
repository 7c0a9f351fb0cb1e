"""The Device protocol, and the rule that says whether a device can measure a target.

A device is where a target's builds are measured: this machine (``local``), a board over ssh (``ssh://``), or
boards behind a TVM RPC tracker (``rpc://``). Every measured decision of a compile goes through one: latency
(:meth:`Device.measure`, by :mod:`edgeq.devices.agent`'s latency and noise rules, run on the device), per-node
profiles (:meth:`Device.profile`) and, where the device computes int8 differently from this machine, the
fidelity runs (:meth:`Device.session`). Files reach a remote device once, by content.

Check rule (:func:`why_not`): a device can measure a target when
1. its architecture is the target's (a TVM GPU target: its host's);
2. its CPU has every flag the target's ``[measure] cpu_flags`` names (int8 numerics and speed on x86 depend on
   VNNI, and AVX2 code dies on a CPU without it);
3. for ONNX Runtime: it has ONNX Runtime, with the target's first execution provider;
4. for TVM: the device can run the target's libraries (a local check: every instruction-set extension the
   target's ``mcpu``/``mattr`` imply, or a GPU; a board behind a tracker runs what it is registered for).
A mismatch is one line; a wrong measurement is never taken instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from edgeq.devices.agent import EXACT_INT8_FLAGS
from edgeq.runtimes.base import Latency, Session
from edgeq.target import Target, host_arch, host_cpu_flags


class Device(Protocol):
    address: str  # local, ssh://…, rpc://…

    def facts(self) -> dict:
        """What the device is and has (:func:`edgeq.devices.agent.facts`, run there)."""
        ...

    def check(self, target: Target, runtime: str = "onnxruntime") -> str:
        """Why this device cannot measure ``target`` with ``runtime``; '' when it can."""
        ...

    def measure(self, models: Mapping[str, Path], feed: Mapping[str, np.ndarray], settings: dict, warmup: int,
                repeats: int, noise: dict) -> dict[str, Latency]:
        """ONNX Runtime latency of each model file, interleaved, with the conditions it was measured in."""
        ...

    def profile(self, model: Path, feed: Mapping[str, np.ndarray], settings: dict, runs: int,
                seconds: float) -> tuple[list[tuple[str, str, float]], int]:
        """(kernel name, op type, total µs) of a profiled ONNX Runtime session, and the runs they cover."""
        ...

    def session(self, model: Path, settings: dict, optimized: bool = True) -> Session: ...

    def close(self) -> None: ...


def why_not(facts: dict, target: Target, runtime: str) -> str:
    """The check rule of this module's docstring on a device's facts ('' when it can measure)."""
    arch = target.tvm.arch if runtime == "tvm" and target.tvm else target.arch
    if facts["arch"] != arch:
        return f"the device is {facts['arch']}, target {target.name} is for {arch}"
    missing = [flag for flag in target.cpu_flags if flag not in set(facts["cpu_flags"])]
    if missing and facts["cpu_flags"]:
        return f"the device's CPU lacks {', '.join(missing)}, which target {target.name} assumes"
    if runtime == "onnxruntime":
        if not facts["onnxruntime"]:
            return "the device has no ONNX Runtime (pip install onnxruntime there)"
        provider = target.onnxruntime.providers[0]
        if provider not in facts["providers"]:
            return (f"{provider} is not available in the device's ONNX Runtime {facts['onnxruntime']} (it has "
                    f"{', '.join(facts['providers'])})")
    return ""


def int8_differs_from_here(facts: dict) -> bool:
    """Whether the device's ONNX Runtime may compute int8 differently from this machine's: another architecture,
    or exact int8 dot products (VNNI, AMX, Arm dot product) on one side only."""
    if facts["arch"] != host_arch():
        return True
    exact = set(EXACT_INT8_FLAGS)
    return bool(exact & set(facts["cpu_flags"])) != bool(exact & host_cpu_flags(EXACT_INT8_FLAGS))


def ort_settings(target: Target) -> dict:
    """The target's ONNX Runtime session settings, as the agent takes them."""
    s = target.onnxruntime
    return {"providers": list(s.providers), "intra_op_threads": s.intra_op_threads,
            "inter_op_threads": s.inter_op_threads, "provider_options": dict(s.provider_options)}


def latencies(answer: dict, address: str) -> dict[str, Latency]:
    """The agent's measure answer as Latency records, each with the conditions and the device it was measured on."""
    conditions = answer["conditions"] | {"device": address}
    return {name: Latency(**stats, conditions=conditions) for name, stats in answer["latency"].items()}
