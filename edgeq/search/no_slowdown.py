"""No-slowdown: while the quantized build is not faster than float, return the nodes whose integer kernels cost
more than their float ones to float, and rebuild (a strategy of :mod:`edgeq.search.trials`).

Rules:
- Each round measures the build interleaved with float; it stops when the median ratio is at most
  ``recipe.max_ratio``, when ``recipe.no_slowdown`` is off, or after ``recipe.max_revert_rounds`` rebuilds.
- Per-node kernel times of both builds (Q/DQ kernels and fused activations counted for the node they serve)
  decide which quantized nodes cost more in int8; only nodes timed in both are judged (ORT renames some fused
  float kernels, and a node with no float time says nothing about its cost). No costly node: stop.
- Of the builds under their bar (:meth:`edgeq.recipe.Recipe.max_ratio_for`: 0.97, or 1.01 for a build of
  at most half float's bytes — returning an embedding table's Gather to float costs that), else of all, the
  one measured fastest over all rounds is chosen (a rebuild can measure worse); with ``holds`` (the
  fidelity guard), each round is also checked on every held-out feed and only builds that hold it may be
  chosen: returning a node to float changes the noise every later layer sees, and on thin margins a build
  with fewer int8 nodes can flip a decision that the full build kept.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path

from edgeq.model_io import folder_bytes
from edgeq.runtimes.base import NodeTime, cost_by_node
from edgeq.search.trials import Candidate, Trial


def no_slowdown(first, rebuild: Callable[[set[str], str], object], kernel_times: Callable[[Path], list[NodeTime]],
                float_path: Path, recipe,
                holds: Callable[[Trial], bool] | None = None) -> Generator[Candidate, Trial, Trial]:
    """``first``: the build to start from (it holds the guard, where ``holds`` is given); ``rebuild(keep_float,
    tag)`` makes the next. Returns the chosen trial (its ``candidate.facts`` hold the round, the node count and
    what was returned to float)."""
    keep, make, best, best_key, opening = set(first.insert.keep_float), (lambda: first), None, None, None
    float_bytes = folder_bytes(float_path.parent)
    for round_index in range(recipe.max_revert_rounds + 1):
        trial = yield Candidate("no-slowdown", f"round {round_index + 1}", make, time=True,
                                feeds=None if holds else 0, facts={"round": round_index})
        current, opening = trial.build, opening or trial
        trial.candidate.facts["quantized_nodes"] = len(current.quantized)
        held = holds is None or holds(trial)
        trial_key = (trial.ratio > recipe.max_ratio_for(folder_bytes(current.path.parent), float_bytes), trial.ratio)
        if held and (best is None or trial_key < best_key):
            best, best_key = trial, trial_key
        if (held and trial.ratio <= recipe.max_ratio) or not recipe.no_slowdown \
                or round_index == recipe.max_revert_rounds:
            break
        owners = current.insert.owners
        float_cost = cost_by_node(kernel_times(float_path), owners)
        int8_cost = cost_by_node(kernel_times(current.path), owners)
        costly = sorted(n for n in current.quantized if n in float_cost and int8_cost.get(n, 0.0) > float_cost[n])
        trial.candidate.facts["returned_to_float"] = costly
        if not costly:
            break
        keep |= set(costly)
        rebuilt = rebuild(keep, str(round_index + 1))
        if not rebuilt.quantized:
            break
        make = lambda built=rebuilt: built  # noqa: E731
    best = best or opening  # none held: the first, which the pipeline's final check then refuses
    best.chosen = True
    return best
