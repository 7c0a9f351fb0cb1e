"""Allocation: the precision of every group, by integer programming over the measured tables.

Rules:
- Variables x[g, p] ∈ {0, 1} with one precision per group (Σ_p x[g, p] = 1): a multiple-choice knapsack,
  solved exactly by HiGHS through scipy's ``milp`` (MixDQ's formulation).
- Objective: latency when a fidelity budget is given (bytes where latency is not measured); otherwise NSR, the
  most accurate configuration within the latency and size budgets; bytes when the search falls back. A tiny
  secondary term breaks ties: toward fidelity when minimizing latency or bytes, toward speed when minimizing NSR.
- Constraints, each when given: predicted NSR ≤ ``max_nsr``, latency ≤ ``max_ms``, bytes ≤ ``max_bytes``.
- The Pareto frontier (ZeroQ's): the fastest configuration under a sweep of NSR caps, from the NSR of the
  fastest configuration down to 0 (all float).
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from edgeq.mixed.costs import Costs
from edgeq.mixed.groups import Group
from edgeq.mixed.sensitivity import Sensitivity

TIE_BREAK = 1e-6
CAP_TOLERANCE = 1e-9
FRONTIER_POINTS = 16


def solve(groups: list[Group], sensitivity: Sensitivity, costs: Costs, minimize: str, max_nsr: float | None = None,
          max_ms: float | None = None, max_bytes: float | None = None) -> dict[str, str] | None:
    """The optimal configuration (group → precision), or None when no configuration meets the constraints.
    ``minimize`` is "latency" (bytes when latency is not measured), "bytes" or "nsr"."""
    pairs = [(g.name, p) for g in groups for p in g.precisions]
    nsr = np.array([sensitivity.nsr[g][p] for g, p in pairs])
    size = np.array([costs.bytes[g][p] for g, p in pairs], dtype=np.float64)
    ms = np.array([costs.latency[g][p] for g, p in pairs]) if costs.latency is not None else None
    speed = ms if ms is not None and minimize != "bytes" else size
    primary, secondary = (nsr, speed) if minimize == "nsr" else (speed, nsr)
    objective = _unit(primary) + TIE_BREAK * _unit(secondary)

    rows, lower, upper = [], [], []
    for g in groups:
        rows.append([1.0 if name == g.name else 0.0 for name, _ in pairs])
        lower.append(1.0)
        upper.append(1.0)
    for cap, coefficients, fixed in ((max_nsr, nsr, 0.0), (max_ms, ms, costs.rest_ms),
                                     (max_bytes, size, costs.rest_bytes)):
        if cap is not None and coefficients is not None:
            rows.append(list(coefficients))
            lower.append(-np.inf)
            upper.append((cap - fixed) * (1 + CAP_TOLERANCE))  # a cap equal to a configuration's total admits it
    from scipy.optimize import Bounds, LinearConstraint, milp  # 0.7 s: only a mixed-precision compile pays it

    with _stdout_to_stderr():
        result = milp(objective, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
                      constraints=LinearConstraint(np.array(rows), lower, upper))
    if result.x is None:
        return None
    return {g: p for (g, p), x in zip(pairs, result.x) if x > 0.5}


def predicted_nsr(sensitivity: Sensitivity, assign: dict[str, str]) -> float:
    return float(sum(sensitivity.nsr[g][p] for g, p in assign.items()))


def pareto_front(groups: list[Group], sensitivity: Sensitivity, costs: Costs, max_bytes: float | None = None,
                 points: int = FRONTIER_POINTS) -> list[dict[str, str]]:
    """Configurations on the (NSR, latency) frontier, fastest first, duplicates removed."""
    fastest = solve(groups, sensitivity, costs, "latency", max_bytes=max_bytes)
    if fastest is None:
        return []
    top = predicted_nsr(sensitivity, fastest)
    positive = [v for g in groups for p, v in sensitivity.nsr[g.name].items() if v > 0]
    if top <= 0 or not positive:
        return [fastest]
    caps = np.geomspace(top, min(positive) / 2, points - 1).tolist() + [0.0]
    front, seen = [], set()
    for cap in caps:
        assign = solve(groups, sensitivity, costs, "latency", max_nsr=cap, max_bytes=max_bytes)
        key = tuple(sorted(assign.items())) if assign else None
        if assign is not None and key not in seen:
            seen.add(key)
            front.append(assign)
    return front


@contextlib.contextmanager
def _stdout_to_stderr():
    """HiGHS sometimes prints debug lines straight to the process's stdout, which ``--json`` needs clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _unit(values: np.ndarray) -> np.ndarray:
    scale = np.abs(values).max() if values.size else 0.0
    return values / scale if scale > 0 else values
