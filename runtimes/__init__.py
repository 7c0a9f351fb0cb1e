"""Runtimes build a model for a target and measure it there (see :mod:`edgeq.runtimes.base`)."""
