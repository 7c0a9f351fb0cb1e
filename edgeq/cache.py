"""An on-disk cache of JSON entries (calibration ranges, sensitivity tables) that is never trusted blindly.

Rules:
- An entry is one file ``<kind>/<digest>.json`` holding the digest of its whole key, the payload and the
  payload's SHA-256. The key is everything the payload depends on; its digest names the file.
- Reading: a missing entry is a miss. An entry that is unreadable, truncated, for another key or whose
  checksum does not match (edited, half-written by a killed process) is deleted and is a miss — never served.
- Writing: into a temporary sibling with a unique name, then renamed over the entry, so concurrent compiles
  and interrupted ones never leave a partial entry where a reader looks.
- A cache that cannot be used (a file where the folder should be, no permission, a full disk) is skipped:
  the compile goes on without it, and :attr:`JsonCache.problems` says why (the manifest records it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

FORMAT = "edgeq-cache/1"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class JsonCache:
    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)
        self.problems: list[str] = []

    @staticmethod
    def key_digest(key) -> str:
        return _digest(json.dumps(key, sort_keys=True, default=str))

    def _path(self, kind: str, key_digest: str) -> Path:
        return self.folder / kind / f"{key_digest[:32]}.json"

    def get(self, kind: str, key):
        """The payload stored for ``key``, or None (a miss; a bad entry is discarded)."""
        if self.folder is None:
            return None
        key_digest = self.key_digest(key)
        path = self._path(kind, key_digest)
        try:
            if not path.is_file():
                return None
            entry = json.loads(path.read_text())
            payload_text = json.dumps(entry["payload"], sort_keys=True)
            if (entry.get("format") != FORMAT or entry.get("key") != key_digest
                    or entry.get("sha256") != _digest(payload_text)):
                raise ValueError("entry does not match its key or checksum")
            return entry["payload"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.problems.append(f"discarded {kind} cache entry {path.name} ({type(exc).__name__})")
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def put(self, kind: str, key, payload) -> None:
        if self.folder is None:
            return
        key_digest = self.key_digest(key)
        path = self._path(kind, key_digest)
        entry = {"format": FORMAT, "key": key_digest, "payload": payload,
                 "sha256": _digest(json.dumps(payload, sort_keys=True))}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as handle:
                json.dump(entry, handle, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            self.problems.append(f"{kind} cache not written under {self.folder} ({exc.strerror or exc})")
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
