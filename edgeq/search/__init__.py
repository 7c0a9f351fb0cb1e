"""Measured choices: candidate builds → measured fidelity (and latency) → the choice, bounded, every trial kept.

:func:`longest_prefix` is the shape shared by the 2:4 stage (prune the least sensitive layers that fit the
budget) and the fidelity guard (keep int8 the least sensitive groups that hold the guard).
"""

from edgeq.search.prefix import longest_prefix

__all__ = ["longest_prefix"]
