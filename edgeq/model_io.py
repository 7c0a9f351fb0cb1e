"""Loading and saving ONNX models safely.

Rules:
- A missing file, a file that is not ONNX protobuf, or a corrupt one is a :class:`UserError`.
- External data must live inside the model's folder; a location that escapes it (absolute path, ``..``, a
  link out or a link loop) is refused before anything is read, and so is an offset or length that does not fit
  the file or the tensor.
- Unnamed nodes get a name (``<OpType>_<n>``), the same for ``inspect`` as for ``compile``.
- The graph must be well formed before any pass sees it: at least one output, every value made once, every
  value read made somewhere (in the graph, an enclosing graph, or as an input or initializer), and no cycle
  (a node reading, through a subgraph too, what it makes). Each breach is one line naming the node.
- Graph inputs and outputs hold tensors: a map (scikit-learn's ZipMap output, a DictVectorizer's input) is
  refused with the re-export that avoids it, a sequence or an optional (a scripted torch module returning a
  list) with the advice to make its tensors inputs or outputs of their own.
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

from edgeq.errors import UserError, first_line

# Above this many bytes of tensor data a model is saved with external data (protobuf caps a message at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Models we write carry at most this IR version (ONNX Runtime 1.31 reads up to 13: edgeq.model_check).
MAX_IR_VERSION = 10


def _check_external_data(proto: onnx.ModelProto, base: Path) -> None:
    root = base.resolve()
    for tensor in _all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        fix = "re-save the model with onnx.save(..., save_as_external_data=True)"
        try:
            info = ExternalDataInfo(tensor)
            location = info.location
            target = (root / location).resolve(strict=False)
        except (ValueError, OSError, RuntimeError) as exc:  # bad offset/length, NUL byte, link loop
            raise UserError(f"external data of tensor '{tensor.name}' is invalid ({first_line(exc)})", fix) from None
        if not location or os.path.isabs(location) or root not in target.parents:
            raise UserError(
                f"external data of tensor '{tensor.name}' points outside the model's folder ({location!r})",
                "move the data file next to the model and store a relative location",
            )
        if not target.is_file():
            raise UserError(
                f"external data file {location!r} of tensor '{tensor.name}' is missing",
                "copy it next to the model file",
            )
        size = target.stat().st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        expected = _tensor_bytes(tensor)
        if offset + length > size or (expected is not None and length != expected):
            raise UserError(f"external data of tensor '{tensor.name}' does not fit {location!r} (offset {offset}, "
                            f"length {length}, file {size} bytes, tensor {expected} bytes)", fix)


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's raw data, or None for types whose size is not fixed (strings) or unknown."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,):
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Name every unnamed node ``<OpType>_<n>`` (exporters often leave names empty; edgeq's decisions,
    ``--exclude name:`` and ``inspect --nodes`` all speak of nodes by name)."""
    nodes = list(all_nodes(proto.graph))
    taken = {n.name for n in nodes if n.name}
    counter = 0
    for node in nodes:
        if node.name:
            continue
        while f"{node.op_type}_{counter}" in taken:
            counter += 1
        node.name = f"{node.op_type}_{counter}"
        taken.add(node.name)


def check_graph(proto: onnx.ModelProto) -> None:
    """The structural rules of the module docstring (a :class:`UserError` naming the first breach)."""
    if not proto.graph.output:
        raise UserError("the model has no outputs", "export it again with its outputs declared")
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for value in values:
            if value.type.WhichOneof("value") in (None, "tensor_type"):  # untyped: ONNX Runtime types it
                continue
            maps = _holds_map(value.type)
            raise UserError(f"{kind} '{value.name}' holds {'maps' if maps else 'a container'} "
                            f"({_type_text(value.type)}), not a tensor; edgeq compiles models whose inputs and "
                            "outputs are tensors",
                            "re-export it without maps (skl2onnx / onnxmltools: options={'zipmap': False})" if maps
                            else f"re-export it with the tensors the {kind} holds as {kind}s of their own")
    _check_graph(proto.graph, set(), "the main graph")


_CONTAINERS = {"sequence_type": "seq", "optional_type": "optional"}  # types holding one element type


def _holds_map(type_: onnx.TypeProto) -> bool:
    kind = type_.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in _CONTAINERS:
        return _holds_map(getattr(type_, kind).elem_type)
    return False


def _type_text(type_: onnx.TypeProto) -> str:
    kind = type_.WhichOneof("value")
    if kind == "map_type":
        key = onnx.helper.tensor_dtype_to_np_dtype(type_.map_type.key_type).name
        return f"map({key}, {_type_text(type_.map_type.value_type)})"
    if kind in _CONTAINERS:
        return f"{_CONTAINERS[kind]}({_type_text(getattr(type_, kind).elem_type)})"
    if kind == "tensor_type":
        return onnx.helper.tensor_dtype_to_np_dtype(type_.tensor_type.elem_type).name
    return kind or "no type"


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"node #{index} ({node.op_type})"


def subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads: its inputs, and what its subgraphs read from outside themselves."""
    names = {n for n in node.input if n}
    for sub in subgraphs(node):
        names |= _free_names(sub)
    return names


def _free_names(graph: onnx.GraphProto) -> set[str]:
    made = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {
        o for n in graph.node for o in n.output if o}
    used = set().union(*(node_reads(n) for n in graph.node)) if graph.node else set()
    used |= {o.name for o in graph.output}
    return used - made


def _check_graph(graph: onnx.GraphProto, outer: set[str], where: str) -> None:
    fix = "fix or re-export the model"
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    maker: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in maker or name in defined:
                raise UserError(f"value '{name}' in {where} is made twice (by {_node_label(node, index)} and "
                                "before)", fix)
            maker[name] = index
    known = defined | set(maker) | outer
    for index, node in enumerate(graph.node):
        for name in node_reads(node):
            if name not in known:
                raise UserError(f"{_node_label(node, index)} in {where} reads '{name}', which no node, input or "
                                "initializer provides", fix)
        for sub in subgraphs(node):
            _check_graph(sub, known, f"a subgraph of {_node_label(node, index)}")
    for output in graph.output:
        if output.name not in known:
            raise UserError(f"output '{output.name}' of {where} is made by no node", fix)
    _check_acyclic(graph, maker, known)


def _check_acyclic(graph: onnx.GraphProto, maker: dict[str, int], known: set[str]) -> None:
    """Kahn's algorithm over the nodes of one graph (a subgraph's outer reads count as its node's inputs)."""
    users: dict[int, list[int]] = {}
    waiting = []
    for index, node in enumerate(graph.node):
        producers = {maker[name] for name in node_reads(node) if name in maker}
        waiting.append(len(producers))
        for producer in producers:
            users.setdefault(producer, []).append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for user in users.get(index, ()):
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if done < len(graph.node):
        stuck = next(i for i, count in enumerate(waiting) if count > 0)
        raise UserError(f"the graph has a cycle through {_node_label(graph.node[stuck], stuck)}",
                        "a model's graph must be acyclic: fix or re-export it")


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
    check_graph(proto)
    _name_nodes(proto)
    _check_external_data(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the external data of {path.name} ({first_line(exc)})",
                        "re-save the model with its data file beside it") from None
    return proto


def graph_only(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A model file read without its external data (the graph, its metadata and any embedded weights); a model
    already read is returned as it is, so that several readers of one file parse it once."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an onnx_ir model (see :func:`load_proto` for the checks)."""
    proto = load_proto(path)
    try:
        return ir.from_proto(proto)
    except Exception as exc:  # noqa: BLE001 — onnx_ir's deserializer raises many kinds for malformed files
        raise UserError(f"{Path(path).name} cannot be read as an ONNX graph ({type(exc).__name__}: "
                        f"{first_line(exc)})", "fix or re-export the model") from None


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
        digest.update(_content_bytes(tensor))
    for node in model.graph:
        digest.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    return digest.hexdigest()


def _content_bytes(tensor: ir.TensorProtocol) -> bytes:
    """A tensor's content as bytes; a string tensor's (a lookup table's keys) each string length-prefixed."""
    if tensor.dtype == ir.DataType.STRING:
        return b"".join(len(s).to_bytes(8, "little") + s for s in tensor.string_data())
    return tensor.tobytes()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (a model and its external data, a manifest)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
