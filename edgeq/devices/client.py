"""The host's half of a remote device: requests to :mod:`edgeq.devices.agent` and files pushed by content.

Rules: a model travels with its external data files as one bundle named by the SHA-256 of their names and
bytes; a bundle the device already has is not sent again (this compile or an earlier one). A feed is a bundle
too (its bytes depend on its arrays alone). How a request reaches the agent (an ssh connection, a TVM RPC
session) is the subclass's ``_call``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from edgeq.devices.agent import npz_arrays, npz_bytes
from edgeq.devices.base import latencies, why_not
from edgeq.runtimes.base import Latency
from edgeq.target import Target

CHUNK = 1 << 20


def _model_files(model: Path) -> list[Path]:
    """A model file and the external data files it names."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    tensors = list(proto.graph.initializer)
    locations = {entry.value for t in tensors for entry in t.external_data if entry.key == "location"}
    return [model] + [model.parent / location for location in sorted(locations)]


class AgentClient:
    """A device whose agent answers requests; subclasses say how a request travels (``_call``)."""

    def __init__(self, address: str):
        self.address = address
        self._facts: dict | None = None
        self._bundles: dict[tuple, tuple[str, list[Path]]] = {}  # file identity → (bundle, files)
        self._present: set[str] = set()

    def _call(self, request: dict, files: list[tuple[str, bytes | Path]] = ()) -> tuple[dict, bytes]:
        """Send one request (and, for ``put``, the files' bytes); the agent's answer and its payload."""
        raise NotImplementedError

    def _push(self, files: list[tuple[str, bytes | Path]]) -> str:
        digest = hashlib.sha256()
        for name, content in files:
            digest.update(name.encode() + b"\0")
            if isinstance(content, bytes):
                digest.update(content)
            else:
                with open(content, "rb") as handle:
                    while chunk := handle.read(CHUNK):
                        digest.update(chunk)
            digest.update(b"\0")
        bundle = digest.hexdigest()
        if bundle not in self._present:
            missing, _ = self._call({"op": "has", "bundles": [bundle]})
            if missing["missing"]:
                sizes = [[n, len(c) if isinstance(c, bytes) else os.path.getsize(c)] for n, c in files]
                self._call({"op": "put", "bundle": bundle, "files": sizes}, files)
            self._present.add(bundle)
        return bundle

    def _model_ref(self, model: Path) -> list[str]:
        model = Path(model)
        stat = model.stat()
        key = (str(model.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in self._bundles:
            files = _model_files(model)
            self._bundles[key] = (self._push([(f.name, f) for f in files]), files)
        return [self._bundles[key][0], model.name]

    def _feed_ref(self, feed: Mapping[str, np.ndarray]) -> list[str]:
        return [self._push([("feed.npz", npz_bytes(dict(feed)))]), "feed.npz"]

    def facts(self) -> dict:
        if self._facts is None:
            self._facts, _ = self._call({"op": "facts"})
        return self._facts

    def check(self, target: Target, runtime: str = "onnxruntime") -> str:
        return why_not(self.facts(), target, runtime)

    def measure(self, models: Mapping[str, Path], feed: Mapping[str, np.ndarray], settings: dict, warmup: int,
                repeats: int, noise: dict) -> dict[str, Latency]:
        request = {"op": "measure", "models": {name: self._model_ref(path) for name, path in models.items()},
                   "feed": self._feed_ref(feed), "settings": settings, "warmup": warmup, "repeats": repeats,
                   "noise": noise, "pin": noise.get("pin")}
        return latencies(self._call(request)[0], self.address)

    def profile(self, model: Path, feed: Mapping[str, np.ndarray], settings: dict, runs: int,
                seconds: float) -> tuple[list[tuple[str, str, float]], int]:
        answer, _ = self._call({"op": "profile", "model": self._model_ref(model), "feed": self._feed_ref(feed),
                                "settings": settings, "runs": runs, "seconds": seconds})
        return [tuple(k) for k in answer["kernels"]], answer["runs"]

    def session(self, model: Path, settings: dict, optimized: bool = True) -> "RemoteSession":
        return RemoteSession(self, Path(model), settings, optimized)

    def run(self, model: Path, feed: Mapping[str, np.ndarray], settings: dict, optimized: bool) -> list[np.ndarray]:
        data = npz_bytes(dict(feed))
        _, payload = self._call({"op": "run", "model": self._model_ref(model), "feed_bytes": len(data),
                                 "settings": settings, "optimized": optimized}, [("feed.npz", data)])
        arrays = npz_arrays(payload)
        return [arrays[str(i)] for i in range(len(arrays))]



class RemoteSession:
    """A model run on the device, feed by feed (the fidelity runs where its int8 differs from this machine's)."""

    def __init__(self, device: AgentClient, model: Path, settings: dict, optimized: bool):
        import onnx

        self.device, self.model, self.settings, self.optimized = device, model, settings, optimized
        self.output_names = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.device.run(self.model, feeds, self.settings, self.optimized)
