"""Costs: per-group latency for each precision, from per-node profiles of whole-model builds, and bytes.

Rules:
- Latency is profiled on whole models, never on a layer alone: ORT fuses a layer with its neighbours
  (Conv+Relu, MatMul+Add, DQ→MatMul→Q into QLinearMatMul), so only a whole build shows what a layer costs.
  One build per precision: every group at that precision where it offers it, int8 elsewhere; the float model
  for float. A group's time is the kernel time of its nodes and of the Q/DQ and fused kernels they own.
- What no group owns (glue, normalization, requantizing Adds, the session's own overhead) is the rest:
  the uniform int8 build's measured median wall time minus its groups' kernel times.
- A configuration's latency is predicted as rest + Σ group times; its size as the ungrouped bytes of the float
  model + Σ group bytes. A measured build puts its numbers back (:meth:`Costs.learn`): interactions no
  profile of a uniform build shows (a float layer makes the int8 MaxPool after it run a slow NCHW kernel) are
  charged to the groups that differ from uniform int8.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeq.mixed.groups import Group


@dataclass
class Costs:
    latency: dict[str, dict[str, float]] | None  # group → precision → ms; None where nothing is measured
    bytes: dict[str, dict[str, int]]
    rest_ms: float
    rest_bytes: int

    def predict(self, assign: dict[str, str]) -> tuple[float | None, int]:
        """(latency ms or None, bytes) of a configuration (group → precision)."""
        size = self.rest_bytes + sum(self.bytes[g][p] for g, p in assign.items())
        if self.latency is None:
            return None, size
        return self.rest_ms + sum(self.latency[g][p] for g, p in assign.items()), size

    def learn(self, assign: dict[str, str], group_ms: dict[str, float], wall_ms: float, base: dict[str, str]) -> None:
        """Put a measured build's numbers back: its groups' profiled times replace the table's entries for the
        chosen precisions; what its wall time still leaves unexplained is charged, in equal parts, to the groups
        whose precision differs from the ``base`` build the rest was measured on (a float layer can make its
        int8 neighbours' glue run slower kernels), or to the rest when none differs."""
        for group, precision in assign.items():
            self.latency[group][precision] = group_ms[group]
        unexplained = wall_ms - self.predict(assign)[0]
        changed = [g for g, p in assign.items() if p != base[g]]
        if not changed:  # times never go below zero: on a busy machine profile and wall time disagree
            self.rest_ms = max(0.0, self.rest_ms + unexplained)
        for group in changed:
            self.latency[group][assign[group]] = max(0.0, self.latency[group][assign[group]]
                                                     + unexplained / len(changed))


def group_times(groups: list[Group], node_ms: dict[str, float]) -> dict[str, float]:
    """Each group's share of a per-node profile (already attributed to original nodes)."""
    return {g.name: sum(node_ms.get(n, 0.0) for n in g.timed) for g in groups}


def uniform(groups: list[Group], precision: str) -> dict[str, str]:
    """Every group at ``precision`` where it offers it, int8 elsewhere."""
    return {g.name: precision if precision in g.precisions else "int8" for g in groups}
