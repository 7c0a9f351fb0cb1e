"""``edgeq cache``: the build cache's entries (``ls``) and removing them (``clean``)."""

from __future__ import annotations

import time

from rich.table import Table

from edgeq.artifact_cache import ArtifactCache
from edgeq.cli.app import debug_option, default_cache_dir, main, out


@main.group()
def cache():
    """The build cache of whole artifacts ($EDGEQ_CACHE_DIR/artifacts; edgeq build fills it)."""


@cache.command(name="ls")
@debug_option
def list_entries():
    """List the cached artifacts (a corrupt entry found is deleted, never listed)."""
    entries = ArtifactCache(default_cache_dir()).entries()
    table = Table("key", "model", "target", "MB", "age", title=f"build cache {default_cache_dir() / 'artifacts'}")
    for entry in entries:
        age = time.time() - entry.description.get("created", time.time())
        table.add_row(entry.key[:12], str(entry.description.get("model", "?")), str(entry.description.get("target", "?")),
                      f"{entry.bytes / 1e6:.2f}", f"{age / 3600:.1f} h")
    out.print(table)


@cache.command()
@debug_option
def clean():
    """Remove every cached artifact, and what killed builds left half-written."""
    freed = ArtifactCache(default_cache_dir()).clean()
    out.print(f"removed the build cache's artifacts: {freed / 1e6:.1f} MB freed")
