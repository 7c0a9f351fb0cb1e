"""ORT-format packaging: the delivered model as ``model.ort`` beside the operator config of a reduced build.

Rules:
1. ONNX Runtime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``) writes the file, at level
   ``all``. Style per target: targets whose providers are all CPU get the *Fixed* style (the optimized graph
   is stored); targets that name a mobile execution provider (NNAPI, CoreML, XNNPACK, QNN) get the *Runtime*
   style (basic optimizations stored, the rest replayed on the device once the provider took its nodes).
   aarch64 targets convert for ``arm`` (int8 QDQ kept int8); x86 targets without the NCHWc layout, whose
   block size is the build machine's vector width (the file would be right only where it was made).
   TensorRT/CUDA targets are refused: the ORT format serves reduced builds, which those providers are not.
2. ``required_operators_and_types.config`` (ops with their types, for ``--include_ops_by_config`` with
   ``--enable_reduced_operator_type_support``) comes from the same tool; its header names the ``.ort`` file
   only, never a path of the build machine.
3. Checked before publishing: the ``.ort`` loads in this ONNX Runtime and its outputs match ``model.onnx``'s,
   run with the same session options, on the check feeds (max |ort − onnx| / max |onnx| ≤ TOLERANCE per
   output); the config lists exactly the (domain, opset, op) kernels the ``.ort`` holds, read back from the
   file's own FlatBuffer, subgraphs included. A miss fails the compile: it would be a converter bug.
4. Recorded: the ONNX Runtime version that wrote it, the ORT format version read from the file, and the
   oldest ONNX Runtime release that reads that format version (:data:`FORMAT_READERS`), which
   ``edgeq verify --ort-version`` answers from.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import sys
import tempfile
import types
from pathlib import Path

import onnxruntime as ort

from edgeq.errors import UserError
from edgeq.target import Target

ORT_FILE = "model.ort"
CONFIG_FILE = "required_operators_and_types.config"
TOLERANCE = 1e-5
MOBILE_PROVIDERS = ("NnapiExecutionProvider", "CoreMLExecutionProvider", "XnnpackExecutionProvider",
                    "QNNExecutionProvider")
# ORT format version → the oldest ONNX Runtime release that loads it (ONNX Runtime's docs, "ORT model format:
# backwards compatibility"; v6 arrived in 1.16). Releases before 1.13 read v4 and older only.
FORMAT_READERS = {"5": "1.13", "6": "1.16"}


def style_for(target: Target) -> tuple[str, str | None]:
    """(optimization style, converter target platform) for a target; rule 1."""
    providers = target.onnxruntime.providers
    foreign = [p for p in providers if p != "CPUExecutionProvider" and p not in MOBILE_PROVIDERS]
    if foreign:
        raise UserError(f"--package ort serves reduced ONNX Runtime builds; target {target.name} runs {foreign[0]}",
                        "deliver model.onnx for that provider, or package for a CPU or mobile target")
    style = "Runtime" if any(p in MOBILE_PROVIDERS for p in providers) else "Fixed"
    return style, "arm" if target.arch == "aarch64" else None


def _import_ort_tools() -> None:
    """Import ``onnxruntime.tools`` without torch: the package's ``__init__`` imports its PyTorch export helper
    whenever torch is installed (1.6–3 s), and no tool edgeq calls uses it — unless torch is loaded already,
    a stub module stands in for that helper."""
    helper = "onnxruntime.tools.pytorch_export_helpers"
    if "torch" not in sys.modules and helper not in sys.modules:
        stub = types.ModuleType(helper, "a stand-in: edgeq does not load ONNX Runtime's PyTorch helper")

        def infer_input_info(*args, **kwargs):
            raise RuntimeError(f"{helper} was not loaded (edgeq stands in for it to avoid importing torch)")

        stub.infer_input_info = infer_input_info
        sys.modules[helper] = stub
    import onnxruntime.tools  # noqa: F401


def _fbs():
    """ONNX Runtime's FlatBuffer readers."""
    _import_ort_tools()
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import AttributeType, InferenceSession

    return AttributeType, InferenceSession


def format_version(path: Path) -> str:
    """The ORT format version stored in an ``.ort`` file (one line UserError if it is not one)."""
    _, InferenceSession = _fbs()
    data = bytearray(Path(path).read_bytes())
    try:
        if not InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(data, 0):
            raise ValueError("no ORT format identifier")
        return InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0).OrtVersion().decode()
    except Exception:  # noqa: BLE001 — a truncated or foreign file fails anywhere in the FlatBuffer reader
        raise UserError(f"{path} is not a readable ORT format model", "rebuild the artifact") from None


def kernels_in(path: Path) -> set[tuple[str, int, str]]:
    """(domain, opset, op type) of every node in an ``.ort`` file, subgraphs included (the kernels it needs)."""
    AttributeType, InferenceSession = _fbs()
    data = bytearray(Path(path).read_bytes())
    found: set[tuple[str, int, str]] = set()

    def walk(graph) -> None:
        for i in range(graph.NodesLength()):
            node = graph.Nodes(i)
            found.add((node.Domain().decode() or "ai.onnx", node.SinceVersion(), node.OpType().decode()))
            for j in range(node.AttributesLength()):
                attribute = node.Attributes(j)
                if attribute.Type() == AttributeType.AttributeType.GRAPH:
                    walk(attribute.G())
                elif attribute.Type() == AttributeType.AttributeType.GRAPHS:
                    for k in range(attribute.GraphsLength()):
                        walk(attribute.Graphs(k))

    walk(InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0).Model().Graph())
    return found


def kernels_listed(config: Path) -> set[tuple[str, int, str]]:
    """(domain, opset, op type) a reduced-build config asks for, parsed by ONNX Runtime's own parser."""
    _import_ort_tools()
    from onnxruntime.tools import reduced_build_config_parser

    required, _ = reduced_build_config_parser.parse_config(str(config), enable_type_reduction=True)
    return {(domain, opset, op) for domain, opsets in required.items() for opset, ops in opsets.items() for op in ops}


@contextlib.contextmanager
def _quiet():
    """The converter prints its progress and logs the temporary paths it wrote: neither is the user's business."""
    tool_log = logging.getLogger("ort_format_model.utils")
    level = tool_log.level
    tool_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tool_log.setLevel(level)


def _session_options(style: str, platform: str | None) -> tuple[ort.SessionOptions, list[str] | None]:
    """The options the converter optimizes with (its own rules), so the ``.onnx`` runs the same graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.qdqisint8allowed", "1" if platform == "arm" else "0")
    if style == "Runtime":
        options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    return options, None if platform == "amd64" else ["NchwcTransformer"]


def _max_relative_error(model: Path, packaged: Path, feeds: list, style: str, platform: str | None) -> float:
    from edgeq.model_check import max_relative_error  # onnx_ir + onnxscript (1 s): not for a cache hit

    sessions = []
    for path in (model, packaged):
        options, disabled = _session_options(style, platform)
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                             disabled_optimizers=disabled))
    return max((max_relative_error(*(s.run(None, feed) for s in sessions)) for feed in feeds), default=0.0)


def package(model: Path, out_dir: Path, target: Target, feeds: list) -> dict:
    """Write ``model.ort`` and the operator config into ``out_dir``, checked (rules 1–3); the manifest record."""
    _import_ort_tools()
    from onnxruntime.tools import convert_onnx_models_to_ort as converter

    style, platform = style_for(target)
    with tempfile.TemporaryDirectory(prefix="edgeq-ort-") as tmp:
        work = Path(tmp)
        for part in (model, model.with_name(f"{model.name}.data")):  # the converter reads a copy, never the artifact
            if part.exists():
                shutil.copy(part, work / part.name)
        with _quiet():
            converter.convert_onnx_models_to_ort(work / model.name, work / "out",
                                                 [converter.OptimizationStyle[style]], target_platform=platform,
                                                 enable_type_reduction=True)
        written = work / "out"
        ort_file = next(written.glob("*.ort"))
        config = next(written.glob("*.config"))
        lines = config.read_text().splitlines(keepends=True)
        body = [line for line in lines if not line.startswith("#")]
        (out_dir / CONFIG_FILE).write_text(f"# Generated from model/s:\n# - {ORT_FILE}\n" + "".join(body))
        shutil.copy(ort_file, out_dir / ORT_FILE)
    packaged, listed = out_dir / ORT_FILE, out_dir / CONFIG_FILE
    error = _max_relative_error(model, packaged, feeds, style, platform)
    needed, asked = kernels_in(packaged), kernels_listed(listed)
    if not error <= TOLERANCE or needed != asked:
        raise RuntimeError(f"ORT-format package check failed: max relative error {error:.3g} (≤ {TOLERANCE}), "
                           f"kernels not in the config {sorted(needed - asked)[:3]}, "
                           f"listed but unused {sorted(asked - needed)[:3]}")
    version = format_version(packaged)
    return {"file": ORT_FILE, "config": CONFIG_FILE, "style": style, "target_platform": platform or "portable",
            "sha256": hashlib.sha256(packaged.read_bytes()).hexdigest(), "bytes": packaged.stat().st_size,
            "onnxruntime": ort.__version__, "ort_format_version": version,
            "readable_from_onnxruntime": FORMAT_READERS.get(version, ort.__version__),
            "kernels": [";".join(map(str, k)) for k in sorted(needed)],
            "check": {"feeds": len(feeds), "max_relative_error": error, "tolerance": TOLERANCE,
                      "config_matches_kernels": True}}
