"""Sensitivity: what each group at each precision costs in output fidelity, measured forward-only.

Rules:
- One group at a time takes a lower precision while every other layer stays float; the model runs on the
  first ``feeds`` calibration feeds and the group's sensitivity at that precision is the output
  noise-to-signal ratio NSR = Σ error² / Σ reference² of the worst float output (SQNR = −10·log10 NSR).
- Noise from independent sources adds, so a configuration's NSR is predicted as the sum of its groups' NSRs
  (the additivity HAWQ and ZeroQ assume too); the search checks every prediction it acts on by measurement.
- The table is cached beside the calibration ranges, keyed by the caller (model, data, ranges, op set, rules).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq.mixed.groups import Group


@dataclass
class Sensitivity:
    nsr: dict[str, dict[str, float]]  # group → precision → output NSR (float: 0)
    feeds: int
    seconds: float = 0.0
    cache_hit: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def output_nsr(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """Worst NSR over the float outputs, each summed over all feeds (outputs listed per feed)."""
    worst = 0.0
    for index in range(len(reference[0])):
        if not np.issubdtype(reference[0][index].dtype, np.floating):
            continue
        signal = sum(float(np.square(r[index], dtype=np.float64).sum()) for r in reference)
        noise = sum(float(np.square(r[index].astype(np.float64) - c[index]).sum())
                    for r, c in zip(reference, candidate))
        worst = max(worst, noise / signal if signal > 0 else (0.0 if noise == 0 else np.inf))
    return worst


def measure_sensitivity(groups: list[Group], build: Callable[[dict[str, str]], Path], runtime, float_path: Path,
                        feeds: list[dict], cache_file: Path | None = None,
                        on_progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """``build(precisions)`` writes a model with those node precisions into a folder of its own, which is
    removed once measured."""
    if cache_file is not None and cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        return Sensitivity(cached["nsr"], cached["feeds"], 0.0, cache_hit=True)
    started = time.perf_counter()
    reference_session = runtime.session(float_path)
    reference = [reference_session.run(feed) for feed in feeds]
    all_float = {node: "float" for g in groups for node in g.nodes}
    trials = [(g, p) for g in groups for p in g.precisions if p != "float"]
    nsr: dict[str, dict[str, float]] = {g.name: {"float": 0.0} for g in groups}
    for done, (group, precision) in enumerate(trials, start=1):
        path = build(all_float | {node: precision for node in group.nodes})
        session = runtime.session(path)
        nsr[group.name][precision] = output_nsr(reference, [session.run(feed) for feed in feeds])
        del session
        shutil.rmtree(path.parent)
        if on_progress:
            on_progress(done, len(trials))
    result = Sensitivity(nsr, len(feeds), time.perf_counter() - started)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nsr": nsr, "feeds": len(feeds)}))
        tmp.replace(cache_file)
    return result
