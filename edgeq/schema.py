"""The JSON schemas of what edgeq writes: ``manifest.json`` (and ``--json``), the build lock and ``edgeq profile``'s
``profile.json``, versioned."""

from __future__ import annotations

import json
from importlib import resources

MANIFEST = "manifest-1"  # artifact/1
LOCK = "lock-1"  # lock/1
PROFILE = "profile-1"  # profile/1 (edgeq profile)


def load(name: str) -> dict:
    """A schema shipped in the package, by name (``MANIFEST``, ``LOCK``, ``PROFILE``)."""
    return json.loads(resources.files("edgeq").joinpath("schemas", f"{name}.schema.json").read_text())
