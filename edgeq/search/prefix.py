"""The longest prefix of an ordered list that still passes a measured test, by bisection.

Rules: ``items`` are ordered from the one that costs least to the one that costs most (least sensitive
first); ``passes(prefix)`` builds and measures a candidate with that prefix treated (pruned, quantized) and the
rest not. The test is assumed monotone — a shorter prefix passes when a longer one does — so bisection needs
at most ⌈log₂(n + 1)⌉ trials. The empty prefix is taken to pass and the whole list to fail (the caller has
measured both, or knows them); the answer is the length of the longest passing prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def longest_prefix(items: Sequence, passes: Callable[[Sequence], bool]) -> int:
    low, high = 0, len(items)  # items[:low] passes, items[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if passes(items[:middle]):
            low = middle
        else:
            high = middle
    return low
