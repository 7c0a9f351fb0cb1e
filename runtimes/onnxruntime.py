"""ONNX Runtime implementation of the Runtime protocol.

Rules: execution providers and thread counts come from the target. Per-node profiles come from ORT's own
profiler; a fused kernel (``QLinearConv`` made from ``DequantizeLinear → Conv → QuantizeLinear``) keeps the
name of the node it was made from plus a ``_token_N`` suffix, which is stripped to map its time back to the
original node; a node ORT fused with its neighbours keeps the first one's name plus ``/<Name>Fusion`` tags
(``MatMul_3/MatMulAddFusion``), which are stripped too; a kernel of ORT's NCHWc layout is named after the
value it makes (``relu_3_nchwc``), and counts for the node that makes that value in the model. Kernels ORT
adds itself (layout Transposes) are reported under their own names. The last ``SESSIONS_KEPT`` sessions are
kept, keyed by the model file's identity and modification time: a compile's latency pair and fidelity run of
one candidate, and the float model every trial is measured against, load once (a 6,400-node model takes 2 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeq import scratch
from edgeq.model_io import save_model
from edgeq.runtimes.base import Latency, NodeTime, measure_interleaved
from edgeq.target import Target

_NCHWC = "_nchwc"
PROFILE_SECONDS = 1.0
SESSIONS_KEPT = 2
_ORT_SUFFIX = re.compile(r"(_token_\d+|/+\w*Fusion/*)+$")


def create_session(model_path: str | os.PathLike, *, intra_op_threads: int = 0, inter_op_threads: int = 0,
                   providers: tuple[str, ...] = ("CPUExecutionProvider",), provider_options: dict | None = None,
                   profile_prefix: str | None = None, optimized: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    opts = [dict((provider_options or {}).get(p, {})) for p in chosen]
    return ort.InferenceSession(str(model_path), options, providers=chosen, provider_options=opts)


def run_exposing(proto: onnx.ModelProto, names: list[str], feeds: Iterable[Mapping[str, np.ndarray]],
                 intra_op_threads: int = 0) -> Iterator[list[np.ndarray]]:
    """Run a model with the float tensors ``names`` added as outputs (``proto`` is changed); yield their
    values feed by feed. One feed in memory at a time."""
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with scratch.scratch_dir("expose") as tmp:
        path = save_model(proto, Path(tmp) / "exposed.onnx")
        del proto
        session = create_session(path, intra_op_threads=intra_op_threads)
        for feed in feeds:
            yield session.run(names, dict(feed))


def _kernel_events(trace: Path) -> Iterator[tuple[str, str, float]]:
    """(kernel name, op type, µs) of each kernel-time event of an ORT profile (one JSON object per line), read
    one line at a time."""
    with trace.open() as lines:
        for line in lines:
            if '_kernel_time"' not in line:
                continue
            event = json.loads(line.strip().rstrip(","))
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                yield event["name"][: -len("_kernel_time")], event.get("args", {}).get("op_name", ""), \
                    event.get("dur", 0)


class _OrtSession:
    def __init__(self, session: ort.InferenceSession):
        self._session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, dict(feeds))


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, target: Target):
        self.target = target
        self.settings = target.onnxruntime
        self._sessions: dict[tuple, _OrtSession] = {}  # least recently used first

    def build(self, model_path: Path, out_dir: Path) -> Path:
        """ORT loads the ONNX file itself: the build moves it, with its external data file, into ``out_dir``."""
        model_path = Path(model_path)
        for part in (model_path, model_path.with_name(f"{model_path.name}.data")):
            if part.exists():
                shutil.move(part, Path(out_dir) / part.name)
        return Path(out_dir) / model_path.name

    def measure(self, models: Mapping[str, Path], feeds: Mapping[str, np.ndarray], warmup: int = 5,
                repeats: int = 50) -> dict[str, Latency]:
        sessions = {name: self.session(path) for name, path in models.items()}
        return measure_interleaved({name: (lambda s=s: s.run(feeds)) for name, s in sessions.items()},
                                   warmup=warmup, repeats=repeats)

    def _session(self, model_path: Path, profile_prefix: str | None = None, optimized: bool = True
                 ) -> ort.InferenceSession:
        return create_session(model_path, intra_op_threads=self.settings.intra_op_threads,
                              inter_op_threads=self.settings.inter_op_threads, providers=self.settings.providers,
                              provider_options=self.settings.provider_options, profile_prefix=profile_prefix,
                              optimized=optimized)

    def session(self, model_path: Path, optimized: bool = True) -> _OrtSession:
        """A session of the model file (``optimized=False``: without ORT's graph optimizations, so that a
        fake-quantized model runs each Q/DQ as written)."""
        stat = Path(model_path).stat()
        key = (str(Path(model_path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, optimized)
        session = self._sessions.pop(key, None) or _OrtSession(self._session(model_path, optimized=optimized))
        self._sessions[key] = session
        while len(self._sessions) > SESSIONS_KEPT:
            del self._sessions[next(iter(self._sessions))]
        return session

    def profile(self, model_path: Path, feeds: Mapping[str, np.ndarray], runs: int = 20) -> list[NodeTime]:
        """Average kernel time per node over up to ``runs`` runs (fewer for slow models: about
        :data:`PROFILE_SECONDS` of runs, at least 3). The trace is read event by event: a Loop body's kernels
        make millions of events."""
        with scratch.scratch_dir("profile") as folder:  # never beside the model: its folder may be read-only
            session = self._session(model_path, profile_prefix=str(folder / "profile"))
            for _ in range(2):
                session.run(None, dict(feeds))
            started = time.perf_counter()
            session.run(None, dict(feeds))
            runs = max(3, min(runs, int(PROFILE_SECONDS / max(time.perf_counter() - started, 1e-6))))
            # ORT's profiler records every run since creation; the 3 warm-up runs are counted too.
            for _ in range(runs):
                session.run(None, dict(feeds))
            graph = onnx.load(str(model_path), load_external_data=False).graph
            makers = {value: node.name for node in graph.node for value in node.output}
            total: dict[tuple[str, str], float] = defaultdict(float)
            for kernel, op_type, microseconds in _kernel_events(Path(session.end_profiling())):
                name = _ORT_SUFFIX.sub("", kernel)
                if name.endswith(_NCHWC):
                    name = makers.get(name[: -len(_NCHWC)], name)
                total[(name, op_type)] += microseconds / 1e3
        count = runs + 3
        return sorted((NodeTime(n, op, ms / count) for (n, op), ms in total.items()), key=lambda t: -t.ms)
