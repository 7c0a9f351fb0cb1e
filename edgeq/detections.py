"""Detections: outputs whose length or order depends on values, judged as unordered sets of items.

A detector with its non-maximum suppression in the graph outputs as many boxes as survive it, in score order;
int8 may keep one box more or less, or swap two of close score. Compared elementwise, such a candidate has
another shape — a broken model — or two boxes wholly wrong. So has a detector without suppression that keeps
its top-K candidates by score (YOLOv10/YOLO26 end-to-end heads: [1, 300, 6]). Rules:
- Which outputs: those computed, however indirectly, from an op whose output's length depends on values
  (:data:`VARIABLE_LENGTH_OPS`, or a node whose subgraph holds one), or from the indices a TopK ranks by
  value (rows gathered in score order), read from the graph. A TopK of constant K orders an output only while
  its K items are still an axis of it (:func:`holds_items`, read on the output's arrays): a TopK inside the
  network — the k nearest neighbours a point-cloud or graph net gathers and then reduces, the experts a
  mixture-of-experts layer routes each token to and sums back — leaves outputs in a fixed order, judged like
  any other.
- Their form, read from every feed's arrays of both models (:class:`SetForm`): leading axes of size 1 in all
  of them are a batch; of what is left, rank ≥ 2 holds items as rows of its last axis, rank ≤ 1 as single
  elements; all-zero rows (the padding of a fixed-length output, TensorFlow's [1, 100, 4]) are no items. An
  output that is one whole number on every feed is a count (of detections): that many items, the fewer of the
  two matched. In an output of the same length on every feed, a column in [0, 1] that ranks the items (non-
  increasing in every array) is their score, and items scoring under :data:`SCORE_FLOOR` are no detections
  (the top-K's tail, which int8 reorders freely).
- A detector's raw output before any NMS (:class:`DetectionHead`: rank 3, per anchor four box columns in
  pixels — width and height ≥ 0 — then a run of score columns in [0, 1], features first as YOLOv8/v11 write
  it or last as YOLOv5; read from float's first feed) is a set too: its items are the detections decoded as
  a deployment decodes them (best score ≥ :data:`SCORE_FLOOR`, class its argmax, per-class NMS at IoU 0.7,
  at most 300). Elementwise its pixel coordinates dominate: nudenet's head held 30 dB while losing detections,
  a captcha slider's YOLOv8-seg head 34.7 dB while losing all 9. Where more values follow the scores (mask
  coefficients, keypoints), their detections are not all the task reads: the output is held elementwise too.
- A detection matched by an item scoring at most :data:`FLOOR_MARGIN` under the floor is kept, not lost: a
  near-tie at the floor is no loss of the task's (detection benchmarks sweep the threshold).
- Items are matched one to one (:func:`matched_items`): equal items first; else, where float's items hold a
  corner-format box, by IoU ≥ 0.5 (as detection benchmarks count a hit) and the same class; else every value
  within 5% of its column's largest float magnitude. Integer items (indices, labels) match only when equal.
- Their error is order-free, per item column (a class, a score, a coordinate are quantities of their own, like
  outputs): matched items count their difference, unmatched ones their whole value (:func:`feed_sets`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from edgeq.model_io import all_nodes, graph_only, node_reads, subgraphs

VARIABLE_LENGTH_OPS = frozenset({"NonZero", "NonMaxSuppression", "Compress", "Unique"})
SCORE_FLOOR = 0.25  # a ranked item scoring less is no detection (the confidence YOLO deployments keep by default)
FLOOR_MARGIN = 0.05  # a detection matched by an item scoring this much under the floor is kept, not lost
MATCH_IOU = 0.5  # a candidate's box matches a float box it overlaps this much (detection benchmarks' IoU 0.5)
MATCH_TOLERANCE = 0.05  # other float values match within this share of their column's largest float magnitude
NMS_IOU = 0.7  # a raw head's box overlapping a better one of its class this much is suppressed (ultralytics' NMS)
MAX_DETECTIONS = 300  # a raw head's detections per image, at most (ultralytics' max_det)


def set_outputs(model: onnx.ModelProto | str | os.PathLike) -> dict[str, frozenset[int] | None]:
    """The model's outputs whose length or order depends on values: those computed from an op whose output's
    length does (:data:`VARIABLE_LENGTH_OPS`, or a node whose subgraph holds one) or from a TopK's indices,
    however indirectly; each with the numbers of items its TopKs chose (None: a number decided by values — a
    variable-length op, or a TopK whose K is computed). ``model``: a file, or its graph already read
    (:func:`edgeq.model_io.graph_only`)."""
    graph = graph_only(model).graph
    constants = _constant_ints(graph)
    tainted: dict[str, frozenset[int] | None] = {}
    for node in graph.node:
        reads = [tainted[name] for name in node_reads(node) if name in tainted]
        if node.op_type in VARIABLE_LENGTH_OPS or any(
                inner.op_type in VARIABLE_LENGTH_OPS for sub in subgraphs(node) for inner in all_nodes(sub)):
            reads.append(None)
        for index, name in enumerate(node.output):
            ranked = node.op_type == "TopK" and index == 1
            lengths = reads + ([frozenset({constants[node.input[1]]}) if node.input[1] in constants else None]
                               if ranked else [])
            if name and lengths:
                tainted[name] = None if None in lengths else frozenset().union(*lengths)
    return {output.name: tainted[output.name] for output in graph.output if output.name in tainted}


def _constant_ints(graph: onnx.GraphProto) -> dict[str, int]:
    """The graph's one-element integer constants (initializers and Constant nodes), by name."""
    values = {tensor.name: tensor for tensor in graph.initializer}
    values.update({node.output[0]: onnx.helper.get_attribute_value(node.attribute[0])
                   for node in graph.node if node.op_type == "Constant" and node.attribute})
    found = {}
    for name, value in values.items():
        if isinstance(value, onnx.TensorProto):
            if np.prod(value.dims, dtype=np.int64) != 1 or uses_external_data(value):
                continue
            value = numpy_helper.to_array(value)
        array = np.asarray(value)
        if array.size == 1 and np.issubdtype(array.dtype, np.integer):
            found[name] = int(array.reshape(-1)[0])
    return found


def holds_items(lengths: frozenset[int] | None, array: np.ndarray) -> bool:
    """Whether one array of a set output (``lengths`` from :func:`set_outputs`) holds items in an order values
    decide: always where their number is decided by values; after TopKs of constant K, while an axis as long as
    one K remains — a reduction over a k-nearest-neighbours axis or a sum of routed experts ended it."""
    return lengths is None or any(k in np.shape(array) for k in lengths)


def _box_columns(items: np.ndarray) -> int | None:
    """Where float's items hold a corner-format box (x1, y1, x2, y2: x2 ≥ x1 and y2 ≥ y1 in every item, some box
    not empty): the first of four adjacent columns, of all such the four most alike in magnitude (coordinates
    share a unit; a class id and a score before a box would pass the order test too). None where none."""
    best, spread = None, np.inf
    for k in range(items.shape[1] - 3):
        x1, y1, x2, y2 = items[:, k:k + 4].T
        if not ((x2 >= x1).all() and (y2 >= y1).all() and ((x2 > x1) & (y2 > y1)).any()):
            continue
        magnitude = np.abs(items[:, k:k + 4]).mean(0)
        ratio = magnitude.max() / magnitude.min() if magnitude.min() > 0 else np.inf
        if best is None or ratio < spread:
            best, spread = k, ratio
    return best


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    wide = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    high = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    overlap = wide * high
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union - overlap > 0, overlap / (union - overlap), 0.0)


def matched_items(ref: np.ndarray, test: np.ndarray, exact: bool) -> list[tuple[int, int]]:
    """The pairs (``ref`` row, ``test`` row) of items matched one to one, ``ref``'s taken in its order (a
    detector's, by score): an equal item first; else, where float's items hold a box (:func:`_box_columns`),
    the one overlapping it most, by IoU ≥ :data:`MATCH_IOU`, else the nearest with every value within
    :data:`MATCH_TOLERANCE` of its column's largest float magnitude — and in both cases with the same class (a
    column of whole numbers, some ≥ 2, outside the box). ``exact`` (integer items: indices, labels): equal only."""
    if not len(ref) or not len(test):
        return []
    box = None if exact else _box_columns(ref)
    coordinates = np.zeros(ref.shape[1], bool)
    if box is not None:
        coordinates[box:box + 4] = True
    classes = ~coordinates & (ref == np.round(ref)).all(0) & (np.abs(ref) >= 2).any(0)
    tolerance = MATCH_TOLERANCE * np.abs(ref).max(0)
    free, pairs = np.ones(len(test), bool), []
    for index, item in enumerate(ref):
        chosen = np.flatnonzero(free & (test == item).all(1))[:1]
        if not chosen.size and not exact:
            fits = free & (test[:, classes] == item[classes]).all(1)
            if box is not None:
                closeness = _iou(item[box:box + 4], test[:, box:box + 4])
                fits &= closeness >= MATCH_IOU
            else:
                distance = np.abs(test - item)
                closeness = -distance.max(1)
                fits &= (distance <= tolerance).all(1)
            chosen = np.flatnonzero(fits)
            chosen = chosen[[np.argmax(closeness[chosen])]] if chosen.size else chosen
        if chosen.size:
            free[chosen[0]] = False
            pairs.append((index, int(chosen[0])))
    return pairs


@dataclass(frozen=True)
class SetForm:
    """How a set output's arrays hold items, read from all of them (module rules)."""

    batch: int  # leading axes of size 1 in every array
    counts: bool  # one element in every array
    score: int | None = None  # the column ranking the items of a fixed-length output

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> SetForm:
        batch = 0
        while all(a.ndim > batch + 1 and a.shape[batch] == 1 for a in arrays):
            batch += 1
        form = cls(batch, all(a.size == 1 for a in arrays))
        if len({a.shape for a in arrays}) != 1 or form.counts or not np.issubdtype(arrays[0].dtype, np.floating):
            return form
        rows = [form._rows(a) for a in arrays]
        if len(rows[0]) < 2:
            return form
        ranking = [c for c in range(rows[0].shape[1]) if all(
            (r[:, c] >= 0).all() and (r[:, c] <= 1).all() and (np.diff(r[:, c]) <= 0).all() for r in rows)]
        return replace(form, score=ranking[0]) if ranking else form

    def _rows(self, array: np.ndarray) -> np.ndarray:
        rows = np.asarray(array, np.float64).reshape(array.shape[self.batch:])
        return rows.reshape(-1, rows.shape[-1] if rows.ndim >= 2 else 1)

    def items(self, array: np.ndarray) -> np.ndarray:
        """The array's items as rows (float64): all-zero rows — padding — and ranked items scoring under
        :data:`SCORE_FLOOR` less :data:`FLOOR_MARGIN` left out."""
        rows = self._rows(array)
        kept = (rows != 0).any(1)
        if self.score is not None:
            kept &= rows[:, self.score] >= SCORE_FLOOR - FLOOR_MARGIN
        return rows[kept]

    def detected(self, items: np.ndarray) -> np.ndarray:
        """Which items are detections: those scoring at least :data:`SCORE_FLOOR` (all, unranked)."""
        return items[:, self.score] >= SCORE_FLOOR if self.score is not None else np.ones(len(items), bool)


def feed_sets(form: SetForm, ref: np.ndarray, test: np.ndarray) -> tuple[int, int, float, np.ndarray, np.ndarray]:
    """One feed of a set output: float's detections, the candidate's, how many of them matched (a detection
    matched by an item scoring at most :data:`FLOOR_MARGIN` under the floor is kept: a near-tie at the floor,
    not a loss), and per column of the items (a class, a score, a coordinate: quantities of their own, like
    outputs) Σ error² order-free — matched items their difference, unmatched detections their whole value —
    and Σ float². A count (of detections) is that many items, the fewer of the two matched, its error its
    difference."""
    if form.counts and _whole(ref) and _whole(test):
        number = int(round(abs(float(ref.flat[0])))), int(round(abs(float(test.flat[0]))))
        return number[0], number[1], min(number), np.array([float(number[0] - number[1]) ** 2]), \
            np.array([float(number[0]) ** 2])
    rows = form.items(ref), form.items(test)
    if rows[0].shape[1] != rows[1].shape[1]:
        signal = np.square(rows[0]).sum(0)
        return len(rows[0]), len(rows[1]), 0, np.full_like(signal, np.inf), signal
    detected = form.detected(rows[0]), form.detected(rows[1])
    signal = np.square(rows[0][detected[0]]).sum(0)
    pairs = [(i, j) for i, j in matched_items(*rows, not np.issubdtype(ref.dtype, np.floating))
             if detected[0][i] or detected[1][j]]  # two items scoring near the floor are no detection
    matched = [np.array([p[side] for p in pairs], int) for side in (0, 1)]
    error = np.square(rows[0][matched[0]] - rows[1][matched[1]]).sum(0)
    for items, paired, counted in zip(rows, matched, detected):  # a detection unmatched: its whole value
        unmatched = counted.copy()
        unmatched[paired] = False
        error += np.square(items[unmatched]).sum(0)
    kept = (detected[0][matched[0]].sum() + detected[1][matched[1]].sum()) / 2  # a detection kept, on either side
    return int(detected[0].sum()), int(detected[1].sum()), kept, error, signal


def worst_column_nsr(error: np.ndarray, signal: np.ndarray) -> float:
    """The largest Σ error² / Σ float² over item columns (0 where both are 0, inf for error on no signal)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        nsr = np.where(signal > 0, error / signal, np.where(error > 0, np.inf, 0.0))
    return float(nsr.max()) if nsr.size else 0.0


def matched_nsr(reference: list[np.ndarray], candidate: list[np.ndarray], head: DetectionHead | None = None) -> float:
    """NSR of a set output over feeds, order-free: its worst column's (:func:`feed_sets`); of a raw ``head``'s,
    its decoded detections'."""
    if head is not None:
        reference, candidate = ([items for array in arrays for items in head.items(array)]
                                for arrays in (reference, candidate))
    form = SetForm.of(reference + candidate) if head is None else head.form
    sums = [feed_sets(form, ref, test)[3:] for ref, test in zip(reference, candidate)]
    return worst_column_nsr(sum(e for e, _ in sums), sum(s for _, s in sums))


@dataclass(frozen=True)
class DetectionHead:
    """A detector's raw output, before any NMS: per anchor a centre-format box in pixels and class scores
    (module rules). Its items are the detections a deployment decodes from it."""

    features_first: bool  # [batch, 4 + scores…, anchors] (YOLOv8/v11) rather than [batch, anchors, 4 + …] (v5)
    scores: int  # how many score columns follow the box (YOLOv5's objectness among them)
    extra: bool  # more values follow the scores: mask coefficients (-seg), keypoints (-pose)
    form: ClassVar[SetForm] = SetForm(0, False, score=4)  # its items' rows: x1, y1, x2, y2, score, class

    @classmethod
    def of(cls, array: np.ndarray) -> DetectionHead | None:
        """The head ``array`` (one feed of float's output) holds, or None where it holds none."""
        if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            return None
        features_first = array.shape[1] < array.shape[2]
        columns = np.moveaxis(array, 1, 2) if features_first else array
        if not 5 <= columns.shape[2] <= columns.shape[1] // 2:
            return None
        box, rest = columns[..., :4], columns[..., 4:]
        if (box[..., 2:] < 0).any() or np.abs(box).max() <= 1:  # sizes ≥ 0, in pixels
            return None
        in_unit = ((rest >= 0) & (rest <= 1)).all((0, 1))
        scores = int(np.argmin(in_unit)) if not in_unit.all() else len(in_unit)
        return cls(features_first, scores, 4 + scores < columns.shape[2]) if scores else None

    def items(self, array: np.ndarray) -> list[np.ndarray]:
        """Per sample, the detections: [x1, y1, x2, y2, score, class] rows of the anchors whose best score is
        at least :data:`SCORE_FLOOR` (less :data:`FLOOR_MARGIN`: :func:`feed_sets`), best first, at most
        :data:`MAX_DETECTIONS`, after a per-class NMS at IoU :data:`NMS_IOU` (ultralytics' defaults)."""
        found = []
        for sample in (np.moveaxis(array, 1, 2) if self.features_first else array).astype(np.float64):
            scores = sample[:, 4:4 + self.scores]
            best, label = scores.max(1), scores.argmax(1)
            scored = np.flatnonzero(best >= SCORE_FLOOR - FLOOR_MARGIN)
            order = scored[np.argsort(-best[scored], kind="stable")]
            centre, size = sample[:, :2], sample[:, 2:4]
            boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
            kept: list[int] = []
            for i in order:
                same = [k for k in kept if label[k] == label[i]]
                if not same or (_iou(boxes[i], boxes[same]) <= NMS_IOU).all():
                    kept.append(i)
                if len(kept) == MAX_DETECTIONS:
                    break
            found.append(np.column_stack([boxes[kept], best[kept], label[kept]]) if kept else np.zeros((0, 6)))
        return found


def _whole(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all() and (values == np.round(values)).all())
