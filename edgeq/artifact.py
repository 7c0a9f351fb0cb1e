"""Artifact: the output folder of a compile — ``model.onnx`` (or a TVM ``model.so``) and ``manifest.json``.

Rules: everything is written into a hidden temporary sibling folder and renamed into place at the end, so a
failed or interrupted compile leaves no half-written output. An existing output folder is replaced only if it
is empty or holds an earlier edgeq artifact (it has a ``manifest.json``); anything else is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from edgeq.errors import UserError

MANIFEST = "manifest.json"
MODEL = "model.onnx"


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is a file", "pass a folder path with -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise UserError(f"output folder {out_dir} is not empty and is not an edgeq artifact",
                        "pass a new or empty folder with -o")


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python and the packages a build depends on (``extra``: more of them), for the manifest."""
    versions = {"python": platform.python_version()}
    for name in ("edgeq", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", *extra):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


class ArtifactWriter:
    """Collects files in a temporary folder; :meth:`publish` moves them into ``out_dir`` at once."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        check_output_dir(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def publish(self, manifest: dict) -> Path:
        text = json.dumps(_finite(manifest), indent=2, sort_keys=True, default=_jsonable)
        self.path(MANIFEST).write_text(text + "\n")
        _apply_umask(self.tmp)  # mkdtemp makes the folder private; an artifact gets the usual permissions
        backup = None
        if self.out_dir.exists():
            backup = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, backup)
        os.replace(self.tmp, self.out_dir)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.out_dir

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            self.discard()


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _finite(value):
    """JSON has no Infinity/NaN: write them as strings ("inf" SQNR means no error at all)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
