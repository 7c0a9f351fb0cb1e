"""Loading and saving ONNX models safely.

Rules:
- A missing file, a file that is not ONNX protobuf, or a corrupt one is a :class:`UserError`.
- External data must live inside the model's folder; a location that escapes it (absolute path, ``..``)
  is refused before anything is read.
- Models whose tensors exceed protobuf's 2 GB limit are saved with external data next to the model.
- Saving is atomic: write into a temporary sibling, then rename.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from edgeq.errors import UserError

# Above this many bytes of tensor data a model is saved with external data (protobuf caps a message at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# ORT 1.31 rejects IR version 11+; models we write carry at most this.
MAX_IR_VERSION = 10


def _check_external_locations(proto: onnx.ModelProto, base: Path) -> None:
    root = base.resolve()
    for tensor in _all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise UserError(
                f"external data of tensor '{tensor.name}' points outside the model's folder ({location!r})",
                "move the data file next to the model and store a relative location",
            )
        if not target.is_file():
            raise UserError(
                f"external data file {location!r} of tensor '{tensor.name}' is missing",
                "copy it next to the model file",
            )


def _all_tensors(proto: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(proto)


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, checking external data locations, and load its external data."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an ONNX file", "pass the .onnx file inside it")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UserError(
            f"{path} is not a readable ONNX model ({type(exc).__name__})",
            "pass a valid .onnx file (re-export it if it was truncated)",
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise UserError(f"{path} holds no ONNX graph", "pass a valid .onnx file")
    _check_external_locations(proto, path.parent)
    onnx.load_external_data_for_model(proto, str(path.parent))
    return proto


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an onnx_ir model (see :func:`load_proto` for the checks)."""
    return ir.from_proto(load_proto(path))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Save atomically; models with more than :data:`EXTERNAL_DATA_THRESHOLD` bytes get external data."""
    path = Path(path)
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    tmp = path.with_name(f".{path.name}.tmp")
    if sum(len(t.raw_data) for t in _all_tensors(proto)) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(tmp))
    os.replace(tmp, path)
    return path


def model_digest(model: ir.Model) -> str:
    """Hash of a model's content. Tensors are hashed one by one, never serialized as a whole, so models over
    protobuf's 2 GB limit hash too."""
    digest = hashlib.sha256()
    for domain, version in sorted(model.opset_imports.items()):
        digest.update(f"{domain}:{version};".encode())
    for value in (*model.graph.inputs, *model.graph.outputs):
        digest.update(f"{value.name}:{value.dtype}:{value.shape};".encode())
    for name in sorted(model.graph.initializers):
        tensor = model.graph.initializers[name].const_value
        digest.update(f"{name}:{tensor.dtype}:{tensor.shape};".encode())
        digest.update(tensor.tobytes())
    for node in model.graph:
        digest.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (a model and its external data, a manifest)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
