"""The 2:4 pattern: at most two non-zeros in every group of four consecutive weights along the reduction
(input-channel) axis — the pattern NVIDIA's sparse tensor cores run.

Rules:
- A weight is viewed as rows × features, groups of four consecutive features per row (``as_groups``); a
  weight obeys 2:4 when no group holds more than two non-zeros. Exact zeros only: int8 quantization with
  zero point 0 keeps them.
- Annotation: a pruned weight tensor carries ``edgeq.sparsity = "2:4"`` and ``edgeq.sparsity.axis`` (its
  reduction axis) in the tensor's ``metadata_props``; the model carries ``edgeq.sparsity`` too. The quantized
  tensor of an annotated weight inherits its marks, so the final artifact can be checked weight by weight.
- Size accounting follows the sparse tensor cores' compressed form: the kept half of the values plus a 2-bit
  index per kept value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.model_io import load_proto

PATTERN = "2:4"
GROUP = 4
KEPT = 2
KEY = "edgeq.sparsity"
AXIS_KEY = "edgeq.sparsity.axis"


def as_groups(weight: np.ndarray, axis: int) -> np.ndarray:
    """[groups, 4]: consecutive fours along ``axis`` (its length must be a multiple of 4)."""
    moved = np.moveaxis(weight, axis, -1)
    return moved.reshape(-1, GROUP)


def magnitude_mask(rows: np.ndarray) -> np.ndarray:
    """Boolean mask [rows, features] keeping the two largest magnitudes of every group of four features."""
    groups = np.abs(rows).reshape(rows.shape[0], -1, GROUP)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :KEPT], True, axis=-1)
    return keep.reshape(rows.shape)


def kept_magnitude(groups: np.ndarray) -> np.ndarray:
    """Sum of the two largest of each four along the last axis (|values|), summed over axis 0; shape
    groups.shape[1:-1]. A sorting network of min/max instead of a sort: this is the inner loop of the
    permutation search."""
    a, b, c, d = (np.abs(groups[..., i]) for i in range(GROUP))
    low1, high1 = np.minimum(a, b), np.maximum(a, b)
    low2, high2 = np.minimum(c, d), np.maximum(c, d)
    smallest_two = np.minimum(low1, low2) + np.minimum(np.maximum(low1, low2), np.minimum(high1, high2))
    return (a + b + c + d - smallest_two).sum(axis=0)


def obeys(weight: np.ndarray, axis: int) -> tuple[bool, int]:
    """(whether every group along ``axis`` has at most two non-zeros, number of groups that do not)."""
    if weight.shape[axis] % GROUP:
        return False, -1
    bad = int(((as_groups(weight, axis) != 0).sum(axis=1) > KEPT).sum())
    return bad == 0, bad


def compressed_bytes(weight: np.ndarray) -> int:
    """Bytes of the sparse tensor cores' form: half the values plus a 2-bit index per kept value."""
    return weight.size // 2 * weight.itemsize + weight.size // 8


def annotate(tensor, axis: int) -> None:
    """Mark an ``onnx_ir`` tensor as 2:4 along ``axis``."""
    tensor.metadata_props[KEY] = PATTERN
    tensor.metadata_props[AXIS_KEY] = str(axis)


@dataclass
class CheckResult:
    """The checker's verdict on every annotated weight of a model file."""

    weights: int = 0
    violations: list[dict] = field(default_factory=list)
    dense_bytes: int = 0
    compressed_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "bytes_ratio": (self.compressed_bytes / self.dense_bytes
                                                               if self.dense_bytes else 1.0)}


def check_model(path: str | Path) -> CheckResult:
    """Check that every weight annotated 2:4 in the model at ``path`` (external data included) obeys it."""
    return check_proto(load_proto(path))


def check_proto(proto: onnx.ModelProto) -> CheckResult:
    result = CheckResult()
    for tensor in proto.graph.initializer:
        marks = {p.key: p.value for p in tensor.metadata_props}
        if marks.get(KEY) != PATTERN:
            continue
        array = numpy_helper.to_array(tensor)
        axis = int(marks.get(AXIS_KEY, -1))
        result.weights += 1
        ok, bad = obeys(array, axis)
        if not ok:
            result.violations.append({"weight": tensor.name, "axis": axis, "bad_groups": bad})
        result.dense_bytes += array.nbytes
        result.compressed_bytes += compressed_bytes(array)
    return result
