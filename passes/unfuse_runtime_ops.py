"""ONNX Runtime's own CPU fusions, found in a model saved from an optimized session, become ONNX ops again.

A model saved with ``SessionOptions.optimized_model_filepath`` (offline optimization, as ONNX Runtime's docs
recommend for start-up time) holds com.microsoft ops edgeq does not quantize: a CNN whose every Conv became a
``FusedConv`` was delivered float. Unfused, its ops quantize like any exporter's, and ONNX Runtime fuses what it
can again when it loads the artifact.

Rules:
- ``FusedConv`` (X, W[, B[, Z]]) → ``Conv`` with its convolution attributes, ``Add`` of the sum input ``Z``
  where present, then its ``activation``.
- ``FusedGemm`` → ``Gemm`` with its Gemm attributes, then its ``activation`` (``activation_alpha``/``_beta``
  are the activation's attributes).
- ``FusedMatMul`` that transposes no batch axes → ``MatMul``, its constant B transposed in its last two axes
  where ``transB`` says, then ``Mul`` by ``alpha`` where it is not 1; with ``transA`` or a computed transposed
  B it is left (the rank the transpose needs is not known before shape inference).
- Activations: Relu, Sigmoid, Tanh, LeakyRelu (alpha), Clip (min, max as constants), HardSigmoid (alpha,
  beta). A node with another activation, or an attribute this list does not name, is left as it is (it stays
  float, and computes what it computed).
- The Conv, Gemm or MatMul made takes the fused node's name (decisions and profiles keep their keys), the
  last node made its output.

Results: :attr:`unfused` (op type → count).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

DOMAIN = "com.microsoft"
_CONV_ATTRIBUTES = {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}
_GEMM_ATTRIBUTES = {"alpha", "beta", "transA", "transB"}
_FUSION_ATTRIBUTES = {"activation", "activation_params", "activation_alpha", "activation_beta",
                      "activation_gamma"}
# activation → the names of its attributes, in the order ONNX Runtime lists their values
_ACTIVATIONS = {"Relu": (), "Sigmoid": (), "Tanh": (), "LeakyRelu": ("alpha",), "Clip": ("min", "max"),
                "HardSigmoid": ("alpha", "beta")}


class UnfuseRuntimeOpsPass(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.unfused: Counter = Counter()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.domain == DOMAIN and node.op_type in _UNFUSE:
                made = _UNFUSE[node.op_type](node)
                if made:
                    _replace(node, made)
                    self.unfused[node.op_type] += 1
        return ir.passes.PassResult(model, modified=bool(self.unfused))


def _constant(node: ir.Node, suffix: str, array: np.ndarray) -> ir.Value:
    """A constant of ``node``'s graph, named after the node."""
    value = ir.Value(name=f"{node.name}_{suffix}", const_value=ir.tensor(array))
    node.graph.register_initializer(value)
    return value


def _activation(node: ir.Node, x: ir.Value) -> list[ir.Node] | None:
    """The nodes computing the fused activation of ``x`` (an empty list: none), or None if it is not one of
    the rules' activations. Its parameters are FusedConv's ``activation_params`` or FusedGemm's
    ``activation_alpha`` / ``_beta``."""
    name = node.attributes.get_string("activation")
    if name is None:
        return []
    attributes = node.attributes
    params = list(attributes.get_floats("activation_params", [])) or [
        attributes.get_float(key) for key in ("activation_alpha", "activation_beta") if key in attributes]
    if name not in _ACTIVATIONS or len(params) < len(_ACTIVATIONS[name]):
        return None
    if name == "Clip":  # its bounds are inputs since opset 11
        bounds = [_constant(node, bound, np.array(value, np.float32)) for bound, value in zip(("min", "max"), params)]
        return [ir.Node("", "Clip", [x, *bounds], num_outputs=1)]
    attributes = [ir.AttrFloat32(key, float(value)) for key, value in zip(_ACTIVATIONS[name], params)]
    return [ir.Node("", name, [x], attributes=attributes, num_outputs=1)]


def _kept(node: ir.Node, allowed: set[str]) -> list[ir.Attr] | None:
    """The node's attributes of ``allowed`` (None when it has one neither allowed nor a fusion attribute)."""
    if set(node.attributes) - allowed - _FUSION_ATTRIBUTES:
        return None
    return [attr for name, attr in node.attributes.items() if name in allowed]


def _conv(node: ir.Node) -> list[ir.Node] | None:
    kept = _kept(node, _CONV_ATTRIBUTES)
    if kept is None:
        return None
    x, weight, bias, addend = (list(node.inputs) + [None] * 4)[:4]
    made = [ir.Node("", "Conv", [x, weight, bias] if bias is not None else [x, weight], attributes=kept,
                    num_outputs=1)]
    if addend is not None:
        made.append(ir.Node("", "Add", [made[0].outputs[0], addend], num_outputs=1))
    activation = _activation(node, made[-1].outputs[0])
    return None if activation is None else made + activation


def _gemm(node: ir.Node) -> list[ir.Node] | None:
    kept = _kept(node, _GEMM_ATTRIBUTES)
    if kept is None:
        return None
    gemm = ir.Node("", "Gemm", list(node.inputs), attributes=kept, num_outputs=1)
    activation = _activation(node, gemm.outputs[0])
    return None if activation is None else [gemm, *activation]


def _matmul(node: ir.Node) -> list[ir.Node] | None:
    attributes = node.attributes
    if set(attributes) - {"alpha", "transA", "transB", "transBatchA", "transBatchB"} \
            or any(attributes.get_int(key, 0) for key in ("transA", "transBatchA", "transBatchB")):
        return None
    a, b = node.inputs
    if attributes.get_int("transB", 0):
        if b is None or b.const_value is None:
            return None
        b = _constant(node, "B_transposed", np.swapaxes(b.const_value.numpy(), -1, -2).copy())
    made = [ir.Node("", "MatMul", [a, b], num_outputs=1)]
    alpha = attributes.get_float("alpha", 1.0)
    if alpha != 1.0:
        made.append(ir.Node("", "Mul", [made[0].outputs[0], _constant(node, "alpha", np.array(alpha, np.float32))],
                            num_outputs=1))
    return made


_UNFUSE = {"FusedConv": _conv, "FusedGemm": _gemm, "FusedMatMul": _matmul}


def _replace(fused: ir.Node, made: list[ir.Node]) -> None:
    """``made`` (a chain) takes ``fused``'s place: its first node (the Conv, Gemm or MatMul) the fused node's name,
    the others it with their op type, and its last node's output the fused node's output (name, type and
    shape: onnx_ir's replacement carries them)."""
    for new in made:
        new.name = new.outputs[0].name = fused.name if new is made[0] else f"{fused.name}_{new.op_type.lower()}"
    ir.convenience.replace_nodes_and_values(fused.graph, fused, [fused], made, fused.outputs[:1],
                                            made[-1].outputs[:1])
