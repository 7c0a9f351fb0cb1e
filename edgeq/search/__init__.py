"""Measured choices: candidate builds → measured latency and fidelity → the choice, bounded, every trial kept.

:mod:`edgeq.search.trials` is the mechanism (build, measure, record; :func:`run` drives a strategy); the
strategies propose candidates and choose: the optional op set (:mod:`edgeq.search.op_sets`), the no-slowdown
rounds (:mod:`edgeq.search.no_slowdown`), the per-tensor calibration method after a guard miss
(:mod:`edgeq.search.ranges`), :func:`longest_prefix` — shared by the fidelity guard (keep int8 the groups
with least noise per millisecond saved that hold it) and the 2:4 stage (prune the least sensitive layers that
fit the budget) — and the mixed-precision loop (:mod:`edgeq.mixed.search`).
"""

from edgeq.search.prefix import longest_prefix
from edgeq.search.trials import Built, Candidate, Trial, Trials, run

__all__ = ["Built", "Candidate", "Trial", "Trials", "longest_prefix", "run"]
