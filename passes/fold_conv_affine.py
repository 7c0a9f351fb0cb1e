"""Per-channel arithmetic after a convolution folds into its weight and bias (rewrite rules for normalize).

BatchNorm is not always a BatchNormalization node: torchvision's ``FrozenBatchNorm2d`` (its detection
backbones) exports as ``x·scale + shift``, Caffe's Scale layer and channels-last ports as Sub/Mul/Add by
per-channel constants. onnxscript folds BatchNormalization into a Conv, and a *scalar* affine, but not these;
ONNX Runtime folds them in its float session, while in an int8 model each stays a float kernel between
requantizations. Yahoo's open_nsfw (Conv → Sub → Mul → Add per channel, 52 times): int8 ×0.70 → ×0.44.

Rules — ``Conv(x, W, b)`` whose output only the node below reads, ``c`` a float constant that varies at most
along the output-channel axis (a scalar, or ``[C, 1, …]`` / ``[1, C, 1, …]`` against the Conv's output):
- ``Mul(conv, c)``, ``Mul(c, conv)`` → ``Conv(x, W·c, b·c)``; ``Div(conv, c)`` → ``Conv(x, W/c, b/c)``
  where no ``c`` is 0;
- ``Add(conv, c)``, ``Add(c, conv)`` → ``Conv(x, W, b + c)``; ``Sub(conv, c)`` → ``Conv(x, W, b − c)``;
- ``c − conv`` and ``c / conv`` are not affine in the same way and are left. A chain folds one node at a
  time (the rewriter applies the rules again until none matches). Computed in float64, stored as the
  weight's type; a missing bias is zeros.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter


def _per_channel(c: ir.Value, weight: np.ndarray) -> np.ndarray | None:
    """``c`` as one value per output channel (length C), or None where it varies along another axis."""
    tensor = ir.convenience.get_const_tensor(c)
    if tensor is None or not np.issubdtype(tensor.dtype.numpy(), np.floating):
        return None
    values = tensor.numpy().astype(np.float64)
    channels, rank = weight.shape[0], weight.ndim
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,))


def _pattern(op_type: str):
    def target(op, x, c):
        return getattr(op, op_type)(op.Conv(x, _allow_other_inputs=True, _outputs=["conv"]), c)
    return target


def _foldable(op_type: str):
    def condition(context, x, c, conv, **_):
        node = conv.producer()
        weight = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if weight is None or bias is not None and ir.convenience.get_const_tensor(bias) is None:
            return False
        if conv.is_graph_output() or len(conv.uses()) != 1:
            return False
        values = _per_channel(c, weight.numpy())
        return values is not None and not (op_type == "Div" and (values == 0).any())
    return condition


def _folded(op_type: str):
    def replacement(op, x, c, conv, **_):
        node = conv.producer()
        weight_value = node.inputs[1]
        weight = weight_value.const_value.numpy()
        channels = weight.shape[0]
        bias = ir.convenience.get_const_tensor(node.inputs[2]).numpy().astype(np.float64) \
            if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(channels)
        values = _per_channel(c, weight)
        scale = {"Mul": values, "Div": 1.0 / values}.get(op_type)
        new_weight = weight.astype(np.float64)
        if scale is not None:
            new_weight, bias = new_weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1)), bias * scale
        else:
            bias = bias + values if op_type == "Add" else bias - values
        name = conv.name or weight_value.name
        return op.Conv(x, op.initializer(ir.tensor(new_weight.astype(weight.dtype)), name=f"{name}_{op_type}_w"),
                       op.initializer(ir.tensor(bias.astype(weight.dtype)), name=f"{name}_{op_type}_b"),
                       **node.attributes)
    return replacement


def _rules() -> list:
    made = []
    for op_type, commutes in (("Mul", True), ("Div", False), ("Add", True), ("Sub", False)):
        rule = rewriter.RewriteRule(_pattern(op_type), _folded(op_type), _foldable(op_type),
                                    name=f"FoldConv{op_type}")
        made += rule.commute() if commutes else [rule]
    return made


RULES = tuple(_rules())
