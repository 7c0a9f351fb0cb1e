"""Artifact: the output folder of a compile — ``model.onnx`` (or a TVM ``model.so``) and ``manifest.json``.

Rules:
- Everything is written into a hidden temporary sibling folder and renamed into place at the end, so a
  failed or interrupted compile leaves no half-written output (and a killed one leaves a folder the next
  compile into the same place sweeps away: :mod:`edgeq.scratch`).
- ``-o`` is checked before any work: not a file, not a symbolic link, not holding the compile's own inputs,
  in a folder edgeq can write, on a disk with room for the artifact (``room`` bytes, the caller's estimate). An existing folder is replaced only if it is empty or is an earlier edgeq
  artifact — a ``manifest.json`` of edgeq's and no file that its manifest does not list (an earlier edgeq's
  manifest without the list: only the files artifacts hold). Anything else is refused, never wiped.
- The manifest lists every file of the artifact and the SHA-256 of each but itself (``edgeq verify`` checks them).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

from edgeq import scratch
from edgeq.errors import UserError

MANIFEST = "manifest.json"
MODEL = "model.onnx"
REPORT = "report.html"  # the manifest as a page with plots (edgeq.report)
# What an artifact folder may hold when its manifest predates the "files" list.
PUBLISH_ATTEMPTS = 3
ARTIFACT_FILES = frozenset({MANIFEST, MODEL, f"{MODEL}.data", "model.so", REPORT})


def _foreign_entry(out_dir: Path) -> str | None:
    """The first entry of an existing folder that is not part of an edgeq artifact, or None."""
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return None
    try:
        manifest = read_manifest(out_dir)
        allowed = set(manifest.get("files") or ARTIFACT_FILES) | {MANIFEST}
    except (OSError, ValueError, AttributeError, TypeError):
        return MANIFEST if MANIFEST in entries else entries[0]
    return next((name for name in entries if name not in allowed or not (out_dir / name).is_file()
                 or (out_dir / name).is_symlink()), None)


def check_output_dir(out_dir: Path, inputs: tuple[Path, ...] = ()) -> None:
    """The rules on ``-o`` (module docstring); ``inputs`` are the paths the compile reads."""
    if out_dir.is_symlink():
        raise UserError(f"output path {out_dir} is a symbolic link", "pass the real folder path with -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is a file", "pass a folder path with -o")
    blocking = next((p for p in out_dir.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"output path {out_dir} is inside {blocking}, which is a file", "pass a folder path with -o")
    resolved = out_dir.resolve()
    for path in inputs:
        inside = Path(path).resolve()
        if inside == resolved or resolved in inside.parents:
            raise UserError(f"-o {out_dir} holds this compile's input {path}", "write the artifact somewhere else")
    if out_dir.is_dir():
        foreign = _foreign_entry(out_dir)
        if foreign is not None:
            raise UserError(f"output folder {out_dir} is not empty and is not an edgeq artifact (it holds "
                            f"{foreign!r})", "pass a new or empty folder with -o")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python and the packages a build depends on (``extra``: more of them), for the manifest."""
    versions = {"python": platform.python_version()}
    for name in ("edgeq", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", *extra):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


class ArtifactWriter:
    """Collects files in a temporary folder; :meth:`publish` moves them into ``out_dir`` at once."""

    def __init__(self, out_dir: str | os.PathLike, inputs: tuple[Path, ...] = (), room: int = 0):
        self.out_dir = Path(out_dir)
        check_output_dir(self.out_dir, inputs)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.out_dir.parent).free
        if free < room:
            raise UserError(f"the disk of {self.out_dir.parent} has {free / 1e6:.0f} MB free, the artifact needs about "
                            f"{room / 1e6:.0f} MB", "free space, or choose another -o")
        self._prefix = f".{self.out_dir.name}."
        scratch.sweep(self.out_dir.parent, self._prefix)
        self.tmp = scratch.make_dir(self.out_dir.parent, self._prefix)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def publish(self, manifest: dict, expected: dict[str, str] | None = None) -> Path:
        """Write ``report.html`` and the manifest (adding the file list and digests to it) and move the folder
        into place; ``expected`` (a locked build): file → SHA-256 the artifact must have, checked before anything
        is published."""
        from edgeq.report import render  # the page is drawn from the manifest published beside it

        title = f"edgeq: {manifest['inputs']['model']['name']} on {manifest['target']['name']}"
        self.path(REPORT).write_text(render(manifest, title))
        names = sorted(p.name for p in self.tmp.iterdir() if p.name != MANIFEST)
        digests = {name: file_digest(self.tmp / name) for name in names}
        differs = sorted(name for name, digest in (expected or {}).items() if digests.get(name) != digest)
        if differs:
            raise RuntimeError(f"the locked replay did not reproduce {differs[0]} (SHA-256 differs from the lock): "
                               "nothing was published")
        manifest.update(files=sorted([*names, MANIFEST]), sha256=digests)  # the caller's copy says so too
        self.path(MANIFEST).write_text(manifest_text(manifest) + "\n")
        _apply_umask(self.tmp)  # mkdtemp makes the folder private; an artifact gets the usual permissions
        backup = scratch.make_dir(self.out_dir.parent, self._prefix, "old")
        try:
            for attempt in range(PUBLISH_ATTEMPTS):  # another compile into the same -o may publish meanwhile
                try:
                    if self.out_dir.exists():
                        check_output_dir(self.out_dir)  # still an artifact (nothing was added while we worked)
                        os.replace(self.out_dir, backup / f"artifact{attempt}")
                    os.replace(self.tmp, self.out_dir)
                    return self.out_dir
                except (FileNotFoundError, FileExistsError, OSError) as exc:
                    if attempt == PUBLISH_ATTEMPTS - 1 or not isinstance(exc, (FileNotFoundError, FileExistsError)) \
                            and exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
        return self.out_dir

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            self.discard()


def read_manifest(folder: Path) -> dict:
    """An artifact folder's manifest, non-finite figures as floats again (OSError or ValueError when the folder
    holds no edgeq manifest)."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    if not isinstance(manifest, dict) or not str(manifest.get("edgeq", "")).startswith("artifact/"):
        raise ValueError("not an edgeq manifest")
    return _nonfinite(manifest)


def manifest_text(manifest: dict) -> str:
    """A manifest as its file holds it (and ``--json`` prints it): sorted keys, non-finite figures as strings
    (``edgeq/schemas/manifest-1.schema.json``)."""
    return json.dumps(_finite(manifest), indent=2, sort_keys=True, default=_jsonable)


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


def _nonfinite(value):
    """The inverse of :func:`_finite`."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nonfinite(v) for v in value]
    return value


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
