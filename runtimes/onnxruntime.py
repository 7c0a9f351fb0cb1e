"""ONNX Runtime implementation of the Runtime protocol, measured on the target's device.

Rules: execution providers and thread counts come from the target, except that fidelity runs on every core of
its device (the thread count changes how fast a kernel runs, not what it computes). Latency and per-node profiles are taken on
the device (:mod:`edgeq.devices`: this machine, or a board); fidelity runs there too where the device may
compute int8 differently from this machine (:func:`edgeq.devices.base.int8_differs_from_here`), and here
otherwise. Per-node profiles come from ORT's own profiler; a fused kernel (``QLinearConv`` made from
``DequantizeLinear → Conv → QuantizeLinear``) keeps the name of the node it was made from plus a ``_token_N``
suffix, which is stripped to map its time back to the original node; a node ORT fused with its neighbours
keeps the first one's name plus ``/<Name>Fusion`` tags (``MatMul_3/MatMulAddFusion``), which are stripped too;
a kernel of ORT's NCHWc layout is named after the value it makes (``relu_3_nchwc``), and counts for the node
that makes that value in the model — or, when ORT fused that node into the kernel (a Conv's Relu), for the
nearest node upstream of it with the kernel's op type (the Conv). Kernels ORT adds itself (layout Transposes)
are reported under their own names. Sessions are kept by the device (:class:`edgeq.devices.agent.Agent`), keyed
by the model file's identity and modification time.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeq import scratch
from edgeq.devices.agent import create_session
from edgeq.devices.base import int8_differs_from_here, ort_settings
from edgeq.devices.local import LocalDevice
from edgeq.model_io import save_model
from edgeq.runtimes.base import Latency, NodeTime, Session
from edgeq.target import Target

__all__ = ["OnnxRuntime", "create_session", "run_exposing", "transposes_optimized"]
_NCHWC = "_nchwc"
PROFILE_SECONDS = 1.0
_ORT_SUFFIX = re.compile(r"(_token_\d+|/+\w*Fusion/*)+$")


def run_exposing(proto: onnx.ModelProto, names: list[str], feeds: Iterable[Mapping[str, np.ndarray]],
                 intra_op_threads: int = 0) -> Iterator[list[np.ndarray]]:
    """Run a model with the tensors ``names`` added as outputs (``proto`` is changed; declared without a type,
    which ONNX Runtime infers, so a value onnx's shape inference cannot type is exposed too); yield their
    values feed by feed. One feed in memory at a time."""
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in existing)
    with scratch.scratch_dir("expose") as tmp:
        path = save_model(proto, Path(tmp) / "exposed.onnx")
        del proto
        session = create_session(path, intra_op_threads=intra_op_threads)
        for feed in feeds:
            yield session.run(names, dict(feed))



# Every basic-level optimizer of ONNX Runtime 1.31 but the transpose optimizer (constraints.txt pins it); an
# unknown name is ignored by ONNX Runtime, and the pass's checks catch one added later that changed the graph.
_OTHER_BASIC_OPTIMIZERS = (
    "Level1_RuleBasedTransformer", "ConstantFolding", "CommonSubexpressionElimination", "ConstantSharing",
    "MatMulAddFusion", "ReshapeFusion", "FreeDimensionOverrideTransformer", "QDQPropagationTransformer",
    "EnsureUniqueDQForNodeUnit", "DoubleQDQPairsRemover", "ConcatSliceElimination", "GatherToSliceFusion",
    "SliceConcatToSpaceToDepthFusion", "CastChainElimination", "RemoveDuplicateCastTransformer",
    "FuseFp16InitializerToFp32NodeTransformer", "SaveShapeValuesFromDataPropagation",
)


def transposes_optimized(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """``proto`` as ONNX Runtime's transpose optimizer alone leaves it (for
    :class:`edgeq.passes.cancel_transposes.CancelTransposesPass`), or None where the runtime cannot load it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with scratch.scratch_dir("transposes") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(_OTHER_BASIC_OPTIMIZERS))
            return onnx.load(options.optimized_model_filepath)
        except Exception:  # noqa: BLE001 - a model the runtime cannot load is compiled (and refused) as it is
            return None

class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, target: Target, device=None):
        """``device``: where to measure (an open :mod:`edgeq.devices` device; default this machine)."""
        self.target = target
        self.device = device or LocalDevice()
        self.settings = ort_settings(target)
        # fidelity sessions run on every core: a thread count changes how fast, not what a kernel computes
        self.fidelity_settings = self.settings | {"intra_op_threads": 0}
        # fidelity is measured where the target's int8 numerics are: on a board only when it computes unlike us
        here = isinstance(self.device, LocalDevice)
        self.fidelity_device = self.device if here or int8_differs_from_here(self.device.facts()) else LocalDevice()

    def build(self, model_path: Path, out_dir: Path) -> Path:
        """ORT loads the ONNX file itself: the build moves it, with its external data file, into ``out_dir``."""
        model_path = Path(model_path)
        for part in (model_path, model_path.with_name(f"{model_path.name}.data")):
            if part.exists():
                shutil.move(part, Path(out_dir) / part.name)
        return Path(out_dir) / model_path.name

    def measure(self, models: Mapping[str, Path], feeds: Mapping[str, np.ndarray], warmup: int = 5,
                repeats: int = 50) -> dict[str, Latency]:
        return self.device.measure(models, feeds, self.settings, warmup, repeats, self.target.noise.to_dict())

    def measure_many(self, jobs: list[Mapping[str, Path]], feeds: Mapping[str, np.ndarray], warmup: int = 5,
                     repeats: int = 50) -> list[dict[str, Latency]]:
        """Each job measured as :meth:`measure` does: in parallel where the device has several boards; on one
        device, every job's models in one interleaved run, where a model that several jobs name (the float
        model each candidate is paired with) runs once a round instead of once per job."""
        noise = self.target.noise.to_dict()
        if hasattr(self.device, "measure_many"):
            return self.device.measure_many(jobs, feeds, self.settings, warmup, repeats, noise)
        paths = dict.fromkeys(Path(path) for job in jobs for path in job.values())
        names = {path: f"model{i}" for i, path in enumerate(paths)}
        measured = self.device.measure({name: path for path, name in names.items()}, feeds, self.settings, warmup,
                                       repeats, noise)
        return [{role: measured[names[Path(path)]] for role, path in job.items()} for job in jobs]

    def session(self, model_path: Path, optimized: bool = True) -> Session:
        """A session of the model file (``optimized=False``: without ORT's graph optimizations, so that a
        fake-quantized model runs each Q/DQ as written), where fidelity is measured."""
        return self.fidelity_device.session(Path(model_path), self.fidelity_settings, optimized)

    def profile(self, model_path: Path, feeds: Mapping[str, np.ndarray], runs: int = 20) -> list[NodeTime]:
        """Average kernel time per node over up to ``runs`` runs on the device (fewer for slow models: about
        :data:`PROFILE_SECONDS` of runs, at least 3)."""
        kernels, count = self.device.profile(Path(model_path), feeds, self.settings, runs, PROFILE_SECONDS)
        graph = onnx.load(str(model_path), load_external_data=False).graph
        makers = {value: node for node in graph.node for value in node.output}
        total: dict[tuple[str, str], float] = defaultdict(float)
        for kernel, op_type, microseconds in kernels:
            name = _ORT_SUFFIX.sub("", kernel)
            if name.endswith(_NCHWC):
                name = _nchwc_owner(makers, name[: -len(_NCHWC)], op_type) or name
            total[(name, op_type)] += microseconds / 1e3
        return sorted((NodeTime(n, op, ms / count) for (n, op), ms in total.items()), key=lambda t: -t.ms)


def _nchwc_owner(makers: Mapping[str, onnx.NodeProto], value: str, op_type: str, depth: int = 3) -> str | None:
    """The node an NCHWc kernel of ``op_type`` that makes ``value`` counts for: the node of that op type nearest
    upstream of the value's maker within ``depth`` nodes (the fused activations and Adds ORT folded into it),
    else the maker itself (None: no node makes the value)."""
    maker = makers.get(value)
    if maker is None:
        return None
    frontier = [maker]
    for _ in range(depth + 1):
        found = next((node for node in frontier if node.op_type == op_type), None)
        if found is not None:
            return found.name
        frontier = [makers[v] for node in frontier for v in node.input if v in makers]
    return maker.name
