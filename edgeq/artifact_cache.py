"""The build cache: whole artifacts, content-addressed, restored in seconds when nothing they depend on changed.

Rules:
1. The key is the SHA-256 of everything a build depends on: the digests of its inputs (model, external data,
   calibration and evaluation data, metric file, resolved target: :func:`edgeq.lock.data_digests`), the build
   file's options, the tool versions, edgeq's own source files, and where latency is measured (this
   machine's CPU, or the RPC device): measured decisions are only as good as the machine that measured them.
2. An entry is ``<cache>/artifacts/<key>/``: the artifact's files and ``entry.json`` (the key, each file's
   SHA-256). It is written into a hidden temporary sibling and renamed into place; when another build renamed
   its entry there first, ours is dropped. Readers never see a partial entry, and two builds at once are safe.
3. A hit is an entry whose ``entry.json`` holds the key and whose every file has its SHA-256; it is restored
   through :class:`edgeq.artifact.ArtifactWriter` (the same ``-o`` rules, the same atomic publish). Anything
   else under the key — unreadable, another key, a changed or missing file — is deleted and is a miss, never
   served. Temporary folders of killed builds are swept by ``edgeq cache clean``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import edgeq
import edgeq.passes
import edgeq.runtimes
import edgeq.targets
from edgeq.artifact import MANIFEST, ArtifactWriter, file_digest, read_manifest, tool_versions

FORMAT = "edgeq-artifact-cache/1"
ENTRY = "entry.json"


def build_key(inputs: dict, options: dict, target: str, where: str) -> str:
    """Rule 1's key."""
    facts = {"inputs": inputs, "options": options, "target": target, "where": where, "tools": tool_versions(),
             "edgeq_source": _source_digest()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def _source_digest() -> str:
    """edgeq's own code: a development install keeps its version number while its code changes."""
    digest = hashlib.sha256()
    for module in (edgeq, edgeq.passes, edgeq.runtimes, edgeq.targets):
        folder = Path(module.__file__).parent
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".toml", ".json"):
                digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def measuring_place(device: str | None) -> str:
    """Where a build's latency is measured: the RPC device, or this machine's CPU model and architecture."""
    if device and device != "local":
        return device
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return f"local {platform.machine()} {model or platform.processor()}"


@dataclass
class Entry:
    key: str
    folder: Path
    description: dict  # what entry.json says besides the digests: model, target, bytes, created

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


class ArtifactCache:
    def __init__(self, root: Path):
        self.root = Path(root) / "artifacts"

    def _folder(self, key: str) -> Path:
        return self.root / key[:32]

    def lookup(self, key: str) -> Entry | None:
        """The entry for ``key`` if it is whole and unchanged (rule 3), else None (a bad entry is deleted)."""
        folder = self._folder(key)
        if not folder.is_dir():
            return None
        try:
            entry = json.loads((folder / ENTRY).read_text())
            if entry.get("format") != FORMAT or entry.get("key") != key:
                raise ValueError("another key")
            present = {p.name for p in folder.iterdir()} - {ENTRY}
            if present != set(entry["files"]) or any(file_digest(folder / n) != d for n, d in entry["files"].items()):
                raise ValueError("files changed")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return Entry(key, folder, {k: v for k, v in entry.items() if k not in ("files", "format")})

    def store(self, key: str, artifact: Path, description: dict) -> None:
        """Rule 2: a copy of the artifact folder under ``key``."""
        if self.lookup(key) is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:32]}.", dir=self.root))
        try:
            files = {}
            for path in sorted(Path(artifact).iterdir()):
                shutil.copy2(path, tmp / path.name)
                files[path.name] = file_digest(tmp / path.name)
            entry = {"format": FORMAT, "key": key, "files": files, "created": time.time(), **description}
            (tmp / ENTRY).write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
            try:
                tmp.rename(self._folder(key))
            except OSError:  # another build stored this key first: its entry is the same artifact
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, entry: Entry, out_dir: Path) -> dict:
        """Publish the entry's artifact into ``out_dir``; returns its manifest."""
        manifest = read_manifest(entry.folder)
        with ArtifactWriter(out_dir) as writer:
            for path in entry.folder.iterdir():
                if path.name not in (ENTRY, MANIFEST):
                    shutil.copy2(path, writer.tmp / path.name)
            writer.publish(manifest)
        return manifest

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        found = (self.lookup(_key_of(folder)) for folder in sorted(self.root.iterdir())
                 if folder.is_dir() and not folder.name.startswith("."))
        return [e for e in found if e is not None]

    def clean(self) -> int:
        """Remove every entry and every temporary folder a killed build left; returns bytes freed."""
        freed = 0
        if self.root.is_dir():
            for folder in self.root.iterdir():
                freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        return freed


def _key_of(folder: Path) -> str:
    try:
        return json.loads((folder / ENTRY).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name  # a bad entry: lookup() deletes it
