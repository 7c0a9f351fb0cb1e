"""Verify an artifact folder: its files are the ones built, and an app's ONNX Runtime can load its model.

Rules:
1. The folder holds an edgeq ``manifest.json``; every file it lists is there, and each file's SHA-256 is the
   one recorded (manifests from before the digests: presence only). A missing or changed file is bad input.
2. The model an app loads is ``model.ort`` when the artifact was packaged (``--package ort``), else
   ``model.onnx``. A TVM artifact (``model.so``) has none: it is checked by rule 1 only.
3. Without a release, the running ONNX Runtime loads it. With ``--ort-version R``: an ``.ort`` whose ORT format
   version R cannot read (:data:`edgeq.runtimes.ort_format.FORMAT_READERS`) is answered "no" at once; otherwise
   release R itself is asked (:mod:`edgeq.runtimes.ort_release`: in process when it is the running one, else
   installed in the cache), unless ``install`` is off — then an ``.ort``'s answer rests on the format version
   alone, a ``.onnx`` gets none, and either says that the kernels were not checked.
"""

from __future__ import annotations

from pathlib import Path

from edgeq.artifact import MANIFEST, MODEL, file_digest, read_manifest
from edgeq.errors import UserError
from edgeq.runtimes import ort_format, ort_release


def _manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", "pass the artifact folder a compile wrote with -o")
    try:
        return read_manifest(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} holds no readable edgeq manifest ({MANIFEST}: {exc.__class__.__name__})",
                        "pass the artifact folder a compile wrote with -o") from None


def check_files(folder: Path, manifest: dict) -> dict:
    """Rule 1: every listed file present, every recorded digest matching."""
    listed = manifest.get("files") or [MANIFEST, MODEL]
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise UserError(f"artifact {folder} lacks {missing[0]}, which its manifest lists", "rebuild the artifact")
    digests = manifest.get("sha256") or {}
    changed = [name for name, digest in sorted(digests.items()) if file_digest(folder / name) != digest]
    if changed:
        raise UserError(f"artifact {folder}: {changed[0]} changed since it was built (SHA-256 differs from the "
                        "manifest)", "rebuild the artifact, or restore the file")
    return {"files": len(listed), "digests_checked": len(digests)}


def verify_artifact(folder: Path, release: str | None, install: bool, cache_dir: Path | None) -> dict:
    """Rules 1–3; ``loads`` is None for an artifact with no ONNX Runtime model."""
    folder = Path(folder)
    manifest = _manifest(folder)
    report = {"artifact": str(folder), **check_files(folder, manifest)}
    package = manifest.get("package")
    name = package["file"] if package else MODEL
    if name not in (manifest.get("files") or [MODEL]):
        if release is not None:
            raise UserError(f"artifact {folder} holds no ONNX Runtime model (it is a {manifest['delivered']['file']})",
                            "drop --ort-version")
        return report | {"model": None, "loads": None}
    report["model"] = name
    if package:
        version = ort_format.format_version(folder / name)
        readable_from = ort_format.FORMAT_READERS.get(version, package["readable_from_onnxruntime"])
        report |= {"ort_format_version": version, "readable_from_onnxruntime": readable_from}
        if release is not None and ort_release.parse_release(release) < ort_release.parse_release(readable_from):
            return report | {"loads": False, "onnxruntime": release, "how": "ORT format version",
                             "why": f"ORT format v{version} is read by ONNX Runtime {readable_from} and later"}
    if release is not None and not install and not ort_release.is_running(release):
        return report | {"loads": True if package else None, "onnxruntime": release, "how": "not installed",
                         "why": "kernels not checked (--no-install)" + (": the ORT format version is readable"
                                                                         if package else "")}
    result = ort_release.try_load(folder / name, release or ort_release.RUNNING, cache_dir)
    return report | result.to_dict()
