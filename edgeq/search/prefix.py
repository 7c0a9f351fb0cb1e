"""The longest prefix of an ordered list that still passes a measured test, by bisection (a strategy).

Rules: ``items`` are ordered from the one that costs least to the one that costs most (least sensitive
first); ``candidate(prefix)`` is the build with that prefix treated (pruned, quantized) and the rest not, and
``passes(trial)`` judges its measurement. The test is assumed monotone — a shorter prefix passes when a longer
one does — so bisection needs at most ⌈log₂(n + 1)⌉ trials. The empty prefix is taken to pass and the whole
list to fail (the caller has measured both, or knows them); the answer is the length of the longest passing
prefix and its trial (None for the empty prefix).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

from edgeq.search.trials import Candidate, Trial


def longest_prefix(items: Sequence, candidate: Callable[[Sequence], Candidate],
                   passes: Callable[[Trial], bool]) -> Generator[Candidate, Trial, tuple[int, Trial | None]]:
    low, high, best = 0, len(items), None  # items[:low] passes, items[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        trial = yield candidate(items[:middle])
        if passes(trial):
            low, best = middle, trial
        else:
            high = middle
    if best is not None:
        best.chosen = True
    return low, best
