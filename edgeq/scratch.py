"""Temporary folders that do not outlive their process for long.

Rules: every temporary folder edgeq makes is named ``<prefix>edgeq-<pid>-<random>``, so that a process killed
before it could clean up (SIGKILL, a power cut) is recognisable: :func:`sweep` removes such folders whose
process no longer runs, and every compile sweeps where it makes its own (the system's temporary folder and
beside ``-o``). A folder of a process that still runs is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(parent: Path | None = None, prefix: str = "") -> None:
    """Remove ``<prefix>edgeq-<pid>-*`` folders in ``parent`` (default: the system's temporary folder) whose
    process is gone."""
    parent = Path(parent or tempfile.gettempdir())
    pattern = re.compile(rf"{re.escape(prefix)}edgeq-(\d+)-")
    with contextlib.suppress(OSError):
        for path in parent.iterdir():
            match = pattern.match(path.name)
            if match and int(match[1]) != os.getpid() and not _alive(int(match[1])) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def make_dir(parent: Path | None = None, prefix: str = "", tag: str = "") -> Path:
    """A new private folder ``<parent>/<prefix>edgeq-<pid>-[<tag>-]<random>``; the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}edgeq-{os.getpid()}-{tag + '-' if tag else ''}", dir=parent))


@contextlib.contextmanager
def scratch_dir(tag: str = "") -> Iterator[Path]:
    """A temporary working folder, removed on exit (and by a later :func:`sweep` if this process is killed)."""
    path = make_dir(tag=tag)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
