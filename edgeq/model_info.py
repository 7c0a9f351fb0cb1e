"""What is in an ONNX file, as a user about to quantize it needs to know.

Reported as stored in the file (nothing is normalized first): opset, inputs/outputs, op counts in the main
graph and inside If/Loop/Scan subgraphs, parameters, weights held in ``Constant`` nodes (they need lifting
before per-channel quantization), whether the model is already quantized, and quantizable coverage for a
target: the share of compute nodes (Conv/Gemm/MatMul…; LSTMs where it runs them in dynamic int8) that sit in the
main graph (those in subgraphs are quantized only where calibration reaches them); and,
for a model with 2:4-annotated weights, the checker's verdict on them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from edgeq.model_io import load_proto
from edgeq.passes.normalize import QUANTIZED_OPS
from edgeq.sparse24 import check_proto
from edgeq.target import Target

SUBGRAPH_OPS = ("If", "Loop", "Scan")


def _walk(graph: onnx.GraphProto, depth: int = 0):
    for node in graph.node:
        yield node, depth
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _walk(sub, depth + 1)


def _shape(value: onnx.ValueInfoProto) -> list:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def model_info(path: str | Path, target: Target | None = None) -> dict:
    proto = load_proto(path)
    graph = proto.graph
    main_ops: Counter = Counter()
    sub_ops: Counter = Counter()
    constant_weights = 0
    params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    nodes = []
    for node, depth in _walk(graph):
        (main_ops if depth == 0 else sub_ops)[node.op_type] += 1
        nodes.append({"name": node.name, "op_type": node.op_type, "depth": depth})
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    size = int(np.prod(attr.t.dims))
                    params += size
                    constant_weights += size >= 16
    info = {
        "file": Path(path).name,
        "bytes": Path(path).stat().st_size,
        "ir_version": proto.ir_version,
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [{"name": v.name, "shape": _shape(v)} for v in graph.input
                   if v.name not in {t.name for t in graph.initializer}],
        "outputs": [{"name": v.name, "shape": _shape(v)} for v in graph.output],
        "parameters": params,
        "constant_weights": constant_weights,
        "ops": dict(sorted(main_ops.items(), key=lambda kv: -kv[1])),
        "subgraph_ops": dict(sorted(sub_ops.items(), key=lambda kv: -kv[1])),
        "subgraphs": sum(main_ops[o] + sub_ops[o] for o in SUBGRAPH_OPS),
        "quantized_ops": sorted((set(main_ops) | set(sub_ops)) & QUANTIZED_OPS),
        "nodes": nodes,
    }
    sparsity = check_proto(proto)
    if sparsity.weights:
        info["sparsity"] = sparsity.to_dict()
    if target is not None:
        rules = target.quantization
        compute = rules.compute_ops + (("LSTM",) if rules.dynamic_lstm else ())  # LSTMs in dynamic int8
        in_main = sum(main_ops[o] for o in compute)
        in_sub = sum(sub_ops[o] for o in compute)
        info["coverage"] = {
            "target": target.name,
            "compute_nodes": in_main + in_sub,
            "in_main_graph": in_main,
            "in_subgraphs": in_sub,
            "quantizable_share": in_main / (in_main + in_sub) if in_main + in_sub else 0.0,
        }
    return info
