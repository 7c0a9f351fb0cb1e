"""The ``edgeq`` command line: one module per verb, registered on the group in :mod:`edgeq.cli.app`."""

from edgeq.cli import bench, build, cache, compile, device, export, init, inspect, profile, targets, verify  # noqa: F401 — each registers its command
from edgeq.cli.app import main

__all__ = ["main"]
