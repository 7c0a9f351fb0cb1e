"""Per-tensor calibration method where the default loses: try each histogram method's range on the tensors of
the most sensitive layer groups, keep what the model's output measures better (a strategy of
:mod:`edgeq.search.trials`).

Rules:
- Runs only where the default lost: the fidelity guard missed. The groups given are taken most sensitive
  first; a group's tensors are the activations its layers read and write (a fused Relu/Clip's
  output for its layer's).
- For each group and each other method (percentile, MSE, entropy: :data:`edgeq.observers.HISTOGRAM_METHODS`)
  whose ranges differ from those in use, one build with the group's tensors at that method's ranges is measured
  on ``FEEDS`` held-out feeds; it is kept when its worst-output SQNR beats the best so far by ``GAIN_DB`` — so
  later groups are tried on top of earlier gains. The first trial measures the ranges in use (the build
  already made with them).
- Returns the ranges to use, per tensor changed the method chosen, and the build with those ranges; every trial
  is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from edgeq.fidelity import worst_sqnr
from edgeq.observers import HISTOGRAM_METHODS
from edgeq.search.trials import Candidate, Trial

FEEDS = 16
GAIN_DB = 0.5


def choose_ranges(groups: list, tensors: Callable[[object], list[str]], by_method: dict[str, dict[str, tuple]],
                  ranges: dict[str, tuple], make: Callable[[dict[str, tuple]], object], in_use: object
                  ) -> Generator[Candidate, Trial, tuple[dict[str, tuple], dict[str, str], object]]:
    """``groups``: most sensitive first; ``tensors(group)``: its activation names; ``by_method``: each tensor's
    range per method; ``make(ranges)``: a build with those ranges; ``in_use``: the build with ``ranges``."""
    trial = yield Candidate("ranges", "ranges in use", lambda: in_use, feeds=FEEDS)
    best, chosen, build = worst_sqnr(trial.fidelity), {}, in_use
    for group in groups:
        names = [name for name in tensors(group) if name in by_method]
        for method in HISTOGRAM_METHODS:
            trying = ranges | {name: by_method[name][method] for name in names}
            if all(trying[name] == ranges[name] for name in names):
                continue
            trial = yield Candidate("ranges", f"{group.name}: {method}", lambda r=trying: make(r), feeds=FEEDS,
                                    facts={"group": group.name, "method": method, "tensors": len(names)})
            sqnr = worst_sqnr(trial.fidelity)
            if sqnr > best + GAIN_DB:
                trial.chosen = True
                best, ranges, build = sqnr, trying, trial.build
                chosen |= dict.fromkeys(names, method)
    return ranges, chosen, build
