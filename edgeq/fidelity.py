"""Fidelity: how far a candidate model's outputs are from the float reference, on held-out feeds.

One number hides failures (a detector whose box coordinates dominate its output tensor kept cosine 0.999
while losing most detections), so every output is reported on its own, and outputs with a channel axis
(axis 1, at most ``MAX_GROUPS`` wide) also report their worst channels. Figures:
- cosine similarity, SQNR in dB (signal power over error power), max absolute error;
- for class-like outputs ([batch, classes]): top-1 agreement and top-5 overlap with the reference;
- the output's kind, read from the reference's values, and the agreement of the decision it carries:
  ``indices`` (integer outputs: the share of equal elements — but [batch, frames] ids that read as CTC frames
  by the rule below, their blank at least half of them — a recognizer that takes the argmax in its graph —
  are ``classes`` judged as decoded),
  ``classes`` (values in [0, 1] whose last axis
  sums to 1: the share of positions whose argmax agrees), ``segments`` (such class values at two or more
  position axes, [batch, H, W, classes]: a per-pixel class map — segmentation, a face/no-face map — judged
  like a mask: intersection over union of the pixels whose argmax is not the background, the class float
  chooses most, counted where the classes agree; a map float gives no other class is a ``map``; at most
  :data:`MAX_GROUPS` classes; and [batch, positions, classes] class values whose positions are a signal's
  frames — not a token input's, not CTC frames — and whose float decisions other than the background come in
  runs of :data:`MIN_SEGMENT_RUN` positions or more on average (at most :data:`MAX_FRAME_CLASSES` classes): a
  seizure detector's half-second segments, a voice detector's frames, where one boundary frame moving is no
  failure and a decoder's tokens rarely repeat), ``scores`` (values in [0, 1] otherwise —
  probability maps, masks: intersection over union of the values above 0.5; where no reference value is above
  0.5 on any feed there is no decision to compare, and the output is a ``map``), ``embedding`` (last axis of
  unit length), ``logits`` (other [batch, C] outputs with more than :data:`FEW_VALUES` per sample — unless the
  model declares C by a symbol or leaves it unknown: an axis that grows with an input, a resampler's or a
  vocoder's waveform, holds no classes (:func:`open_axis_outputs`) —, or whose
  name says they are logits — a 2-class sentiment head's, as Hugging Face models name them — and [batch,
  positions, C] outputs so named — a language model's next-token logits, a tagger's: argmax agreement over
  positions, padded ones not judged), ``values`` (at most :data:`FEW_VALUES` per sample — per feed for outputs
  of rank 0 and 1: scores, regressions — a [batch, 3] quality score or a [batch, 4] box offset looks like
  logits, and a few numbers are judged as numbers, however many samples a feed batches), ``change`` (an
  output of more values per sample, none of the kinds before, not named logits, with the shape of a float
  input on every feed: an autoencoder's reconstruction, a denoiser's or an enhancer's output — the input
  changed. Its figure is the SQNR of that change, float's output minus the input: an anomaly detector's score
  is its reconstruction error, which the output's own power hides, and its argmax decides nothing; where the
  output has less power than that change, it is no input changed but a network whose output has its input's
  shape, and the figure is the output's SQNR, as a map's), ``curve`` (other [batch, C] rows, not named logits
  or features, whose neighbouring values differ by at most :data:`MAX_CURVE_ROUGHNESS` of the row's spread on
  average — a forecast, a profile: its argmax is the position of its peak, not a class, and class logits in any
  class order differ by about their spread, 1.13 of it for independent ones — judged by the SQNR of each row's
  shape, its mean removed: a forecast's level comes with its input, and an error as large as the forecast's
  swing can hide under it) and ``map`` (anything else: spectrograms, box maps);
- for ``classes`` outputs with positions ([batch, positions, classes]: a decoder's tokens, a tagger's labels) and
  a single position axis the **sequence agreement**: the share of samples whose decisions agree at every
  position. A few held-out samples rarely show the one flip that changes a sequence, so the figure is the lower
  of the observed share and the share expected from the margins: each position's chance to flip is the share of
  the margin changes measured at all positions (log-probability of the float top-1 minus its runner-up, candidate
  vs float) that would overturn its own float margin, a sample agrees when all of its positions do, and the share
  is the lower bound of a one-sided 90% confidence interval of the mean over samples (a table decoder held 0.991
  as a mean over 30 tables, 0.982 as the bound, and lost 5 of 100 unseen tables' sequences). Where a feed's
  integer [batch, positions] input shows padding (:func:`padding_of`: an attention mask's zeros, or the trailing
  run of a pad id), the padded positions of a classes output with those leading axes are not judged (argmax or
  sequence): a tagger's outputs there are noise no task reads; nor are rows float holds constant (a decoder's
  step past its end with all logits 0: a uniform row decides nothing). Positions that are CTC frames (a text
  line's or an utterance's recognizer, [batch, frames, classes]) agree as decoded: repeats collapsed and the
  blank dropped — their decision agreement is the share of the float decoding's symbols kept (1 − edit distance /
  symbols, character accuracy against float) — and only frames whose flip to their runner-up changes the decoding
  count in the expected share (a flip between a character and the blank beside it, at every character's edge,
  changes nothing). An output reads as CTC frames when the class float decides most often — the blank, class 0 or
  the last (the two conventions) — lies between two other decisions in at least half the samples (a decoder's
  end-of-sequence padding only trails), and no integer input of the feed has as many positions (a tagger's
  labels, where repeats and the majority label mean something); ``ctc_blank`` names it. A [batch, frames, C]
  output of logits or log-probabilities (a CRNN trained with CTC loss; values outside [0, 1], so not a
  detector's per-class sigmoid scores) that reads as CTC frames by its argmax is judged the same way, as
  ``classes`` (margins are differences of logits, which are differences of log-probabilities); a rank-3 output
  whose second axis is a feed's batch and whose first is not is time-major ([frames, batch, C], torch's CTC
  layout) and is read with the two swapped. Features — an output named as a hidden state or features
  (``hidden``, ``embed``, ``feature`` in its name: a Whisper or BERT encoder's ``last_hidden_state``, a sentence
  encoder's token embeddings) or made by a normalization (recorded by :mod:`edgeq.passes.normalize`, rule 7:
  a face embedding's last BatchNorm; :func:`feature_outputs`) — are never read as CTC frames or logits: their
  argmax over features decides nothing (a sinusoidal position feature that wins most frames looked like a blank
  between other "symbols"); with one vector per sample ([batch, D]: a pooled sentence embedding, a face
  embedding) they are an ``embedding``, else a ``map``;
- ``detections``: an output whose length or order depends on values (a detector's boxes, scores and labels
  after its non-maximum suppression or its top-K by score, a heat map's peaks: :mod:`edgeq.detections`), and
  a detector's raw head before its NMS (decoded as deployments decode it), is an unordered set of items whose
  number and order may differ between the two models; its decision agreement is the F1 of the items matched
  one to one, summed over feeds, and its SQNR the worst item column's, order-free;
- a user metric ``fn(outputs, feeds) -> float`` computed on both models (higher is better), and its drop.

Non-finite values: figures are computed where both outputs are finite. A candidate that outputs NaN or ±inf
where the reference is finite has failed (``nonfinite`` counts them; its SQNR is −inf and its cosine 0), however
close the rest is; non-finite values of the reference itself are counted (``reference_nonfinite``).
Outputs whose channel count changes from feed to feed (variable length) report no per-channel figures.
A metric that raises, or returns something other than a finite number, is a :class:`UserError`.

Accumulation is streaming (sums per feed), except that outputs are kept when a user metric needs them, and
detections always.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx

from edgeq.detections import DetectionHead, SetForm, feed_sets, holds_items, set_outputs, worst_column_nsr
from edgeq.errors import UserError, first_line
from edgeq.model_io import graph_only
from edgeq.passes.normalize import FEATURES_KEY
from edgeq.user_code import load_callable

MAX_GROUPS = 4096
TOPK = 5
FEW_VALUES = 16
_EPS = 1e-3  # how close a reference's values must be to [0, 1], to sum 1 or to unit length for a kind
MARGIN_ROWS = 1 << 20  # positions whose margins are kept for the sequence agreement (4 floats each)
MIN_SEGMENT_RUN = 8  # positions a frame classifier's events last on average (a decoder's tokens rarely repeat)
MAX_CURVE_ROUGHNESS = 0.5  # a curve's neighbouring values differ by at most this share of its spread, on average
MAX_FRAME_CLASSES = 256  # a frame classifier's classes; a softmax over a vocabulary is a decoder's (and its
#                          confusion matrix would be vocabulary² counts)
_TINY = 1e-30  # probabilities are floored here before their log
CONFIDENCE_Z = 1.2816  # the expected sequence agreement is the lower bound of a one-sided 90% interval


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    if signal <= 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


@dataclass
class _OutputStats:
    dot: float = 0.0
    ref_sq: float = 0.0
    test_sq: float = 0.0
    err_sq: float = 0.0
    max_abs: float = 0.0
    rows: int = 0
    top1: float = 0.0
    topk: float = 0.0
    class_like: bool = False
    group: dict = field(default_factory=dict)
    grouped: bool = True  # False once the channel count changed between feeds
    nonfinite: int = 0
    reference_nonfinite: int = 0
    # evidence of the output's kind, from the reference, and the agreement of the decisions it carries
    unit_interval: bool = True
    sums_to_one: bool = True
    unit_norm: bool = True
    rank: int = 0
    last: int = 0
    elements: int = 0
    argmax_agree: int = 0
    argmax_rows: int = 0
    above_ref: int = 0
    above_test: int = 0
    above_both: int = 0
    confusion: np.ndarray | None = None  # [float class, candidate class] pixel counts of a class map
    # per sample of a [batch, positions…, classes] output: float top-1 / runner-up values, and the candidate's
    # values at those two classes (for the expected sequence agreement), and how many samples agreed outright
    margins: list = field(default_factory=list)
    decisions: list = field(default_factory=list)  # per sample [3, positions]: float top-1, runner-up, candidate
    margin_rows: int = 0
    tokenized: bool = False  # positions are a token input's (a tagger): never read as CTC frames
    named_logits: bool = False  # the model names the output logits: a classifier's, however few classes
    named_features: bool = False  # the model names the output a hidden state or features: no decision in it
    open_last: bool = False  # the model declares the last axis by a symbol: it grows with an input, no classes
    changes_input: bool = True  # every feed had a float input of this output's shape: that input, changed
    roughness: float = 0.0  # [batch, C] rows: the sum over rows of mean |neighbours' difference| / spread
    varied_rows: int = 0  # rows whose values are not all equal
    shape_sq: float = 0.0  # the power of the rows with their means removed (a curve's shape)
    change_sq: float = 0.0  # the power of the change float made (its output minus that input)
    samples: int = 0
    samples_agree: int = 0

    def _evidence(self, ref: np.ndarray, test: np.ndarray, padding: np.ndarray | None,
                  token_lengths: set[int]) -> None:
        per_sample = ref.size // ref.shape[0] if ref.ndim >= 2 and ref.shape[0] else ref.size
        self.rank, self.elements = ref.ndim, max(self.elements, per_sample)
        self.last = ref.shape[-1] if ref.ndim else 1
        lowest = ref.min() if ref.size else 0.0
        if ref.size:
            self.unit_interval &= bool(lowest >= -_EPS / 1000 and ref.max() <= 1 + _EPS / 1000)
        if ref.ndim and self.last >= 2 and ref.size:
            rows_sum_to_one = bool(np.abs(ref.sum(-1) - 1).max() <= _EPS)
            self.sums_to_one &= rows_sum_to_one
            self.unit_norm &= bool(np.abs(np.sqrt(np.square(ref).sum(-1)) - 1).max() <= _EPS)
            rows = ref.reshape(-1, self.last), test.reshape(-1, self.last)
            decided = rows[0].argmax(1), rows[1].argmax(1)
            agree = decided[0] == decided[1]
            judged = np.ones(agree.shape, bool)
            if ref.ndim >= 3 and padding is not None and padding.shape == ref.shape[:2]:
                judged = np.broadcast_to(~padding.reshape(padding.shape + (1,) * (ref.ndim - 3)),
                                         ref.shape[:-1]).reshape(-1)
            judged = judged & (rows[0].max(1) > rows[0].min(1))  # a constant row decides nothing
            self.argmax_agree += int(agree[judged].sum())
            self.argmax_rows += int(judged.sum())
            if ref.ndim >= 4 and self.last <= MAX_GROUPS or ref.ndim == 3 and self.last <= MAX_FRAME_CLASSES:
                counted = slice(None) if ref.ndim >= 4 else judged
                pairs = decided[0][counted] * self.last + decided[1][counted]
                counts = np.bincount(pairs, minlength=self.last ** 2).reshape(self.last, self.last)
                self.confusion = counts if self.confusion is None or self.confusion.shape != counts.shape \
                    else self.confusion + counts
            if ref.ndim == 2 and self.last > 2:
                spread = ref.std(1)
                varied = spread > 0
                self.roughness += float((np.abs(np.diff(ref[varied], axis=1)).mean(1) / spread[varied]).sum())
                self.varied_rows += int(varied.sum())
                self.shape_sq += float(np.square(ref - ref.mean(1, keepdims=True)).sum())
            if ref.ndim == 3:
                self.tokenized |= ref.shape[1] in token_lengths
                self._positions(rows, decided[1], agree, judged, ref.shape[0], rows_sum_to_one and lowest >= 0)
        else:
            self.sums_to_one = self.unit_norm = False
        ref_above, test_above = ref > 0.5, test > 0.5
        self.above_ref += int(ref_above.sum())
        self.above_test += int(test_above.sum())
        self.above_both += int((ref_above & test_above).sum())

    def _positions(self, rows: tuple[np.ndarray, np.ndarray], candidate: np.ndarray, agree: np.ndarray,
                   judged: np.ndarray, batch: int, probabilities: bool) -> None:
        """Keep each sample's decisions and margins (in log-probability units: the log of probabilities; logits
        and log-probabilities as they are — a difference of logits is one of log-probabilities)."""
        self.samples += batch
        self.samples_agree += int((agree | ~judged).reshape(batch, -1).all(1).sum())
        if self.margin_rows + int(judged.sum()) > MARGIN_ROWS:
            return
        top2 = np.argsort(-rows[0], axis=1)[:, :2]
        pairs = np.stack([np.take_along_axis(r, top2, 1) for r in rows], 1)  # [rows, model, top-1 / runner-up]
        pairs = (np.log(np.maximum(pairs, _TINY)) if probabilities else pairs).astype(np.float32)
        per_sample = judged.reshape(batch, -1)
        self.margins.extend(part[keep] for part, keep in zip(np.split(pairs, batch), per_sample))
        classes = np.stack([top2[:, 0], top2[:, 1], candidate]).astype(np.int32)
        self.decisions.extend(part[:, keep] for part, keep in zip(np.split(classes, batch, axis=1), per_sample))
        self.margin_rows += int(judged.sum())

    def ctc_blank(self) -> int | None:
        """The blank class when the float decisions read as CTC frames (see the module's rules), else None."""
        if self.tokenized or not self.decisions or len(self.decisions) != self.samples:
            return None
        counts = np.bincount(np.concatenate([d[0] for d in self.decisions]), minlength=self.last)
        blank = int(counts.argmax())
        if blank not in (0, self.last - 1):
            return None
        inside = [_blank_inside(d[0], blank) for d in self.decisions]
        return blank if np.mean(inside) >= 0.5 else None

    def sequence_agreement(self, blank: int | None) -> float:
        """The lower of the observed and the margin-expected share of samples agreeing at every position (the
        lower 90% confidence bound of the mean over samples: a few tables or sentences estimate it); CTC frames
        agree where their decoded sequences do (``blank``: :meth:`ctc_blank`), and only positions whose flip
        would change it count."""
        observed = self.samples_agree / self.samples if blank is None else \
            float(np.mean([_ctc_decode(d[0], blank) == _ctc_decode(d[2], blank) for d in self.decisions]))
        if not self.margins:
            return observed
        kept = [(p, d) for p, d in zip(self.margins, self.decisions) if len(p)]
        if not kept:
            return observed
        values = [v for v, _ in kept]
        margin = [v[:, 0, 0] - v[:, 0, 1] for v in values]
        change = np.sort(np.concatenate([v[:, 1, 0] - v[:, 1, 1] for v in values]) - np.concatenate(margin))
        if blank is not None:
            margin = [m[_ctc_decisive(d, blank)] for m, (_, d) in zip(margin, kept)]
        flip = [np.searchsorted(change, -m) / change.size for m in margin]  # share of changes that overturn m
        agree = np.array([np.prod(1.0 - f) for f in flip])  # each sample's chance to agree at every position
        spread = float(agree.std(ddof=1)) / np.sqrt(agree.size) if agree.size > 1 else 0.0
        return min(observed, float(agree.mean() - CONFIDENCE_Z * spread))

    def _background(self) -> int:
        """A class map's background: the class float chooses most."""
        return int(self.confusion.sum(1).argmax())

    def _foreground(self) -> tuple[int, int]:
        """A class map's pixels whose argmax is not the background, in both models with the same class, and in
        either."""
        background = self._background()
        both = int(np.trace(self.confusion)) - int(self.confusion[background, background])
        return both, int(self.confusion.sum()) - int(self.confusion[background, background])

    def frame_segments(self) -> bool:
        """Whether a [batch, positions, classes] output's positions are a signal's frames, classified: not a
        token input's, not CTC frames, and float's decisions other than the background (its most chosen
        class) come in runs of :data:`MIN_SEGMENT_RUN` positions on average."""
        if self.rank != 3 or self.tokenized or self.confusion is None or len(self.decisions) != self.samples:
            return False
        background = self._background()
        runs = frames = 0
        for decided in (d[0] for d in self.decisions if d.shape[1]):
            starts = np.flatnonzero(np.r_[True, decided[1:] != decided[:-1]])
            runs += int((decided[starts] != background).sum())
            frames += int((decided != background).sum())
        return runs > 0 and frames / runs >= MIN_SEGMENT_RUN

    def kind(self, blank: int | None) -> str:
        """The output's kind (module rules); ``blank``: :meth:`ctc_blank`, found once by the caller."""
        if self.sums_to_one and self.unit_interval:
            if self.rank >= 4 and self.confusion is not None:
                return "segments" if (self.confusion.sum(1) > 0).sum() > 1 else "map"
            if blank is None and self.frame_segments():
                return "segments"
            return "classes"
        if self.rank == 3 and not self.unit_interval and blank is not None and not self.named_features:  # CTC
            return "classes"
        if self.unit_interval and self.above_ref:
            return "scores"
        if self.unit_norm or self.named_features and self.rank == 2:
            return "embedding"
        curve = self.rank == 2 and self.varied_rows and self.roughness / self.varied_rows <= MAX_CURVE_ROUGHNESS
        classifier = not self.named_features and self.last >= 2 and (
            self.rank == 2 and not self.open_last and not curve or self.named_logits and self.rank in (2, 3))
        if self.changes_input and self.elements > FEW_VALUES and not self.named_logits:
            return "change"
        if self.elements <= FEW_VALUES and not (classifier and self.named_logits):
            return "values"
        if classifier:
            return "logits"
        return "curve" if curve else "map"

    def decision_agreement(self, kind: str, blank: int | None) -> float | None:
        if blank is not None:  # symbols of the decoded sequences: 1 − edits / float's symbols
            decoded = [(_ctc_decode(d[0], blank), _ctc_decode(d[2], blank)) for d in self.decisions]
            symbols = sum(len(ref) for ref, _ in decoded)
            return 1.0 - sum(_edits(ref, test) for ref, test in decoded) / max(symbols, 1)
        if kind in ("classes", "logits"):
            return self.argmax_agree / self.argmax_rows if self.argmax_rows else 1.0
        if kind == "segments":
            both, either = self._foreground()
            return both / either
        if kind == "scores":
            union = self.above_ref + self.above_test - self.above_both
            return self.above_both / union if union else 1.0
        return None

    def update(self, ref: np.ndarray, test: np.ndarray, padding: np.ndarray | None = None,
               token_lengths: set[int] = frozenset(), changed: np.ndarray | None = None) -> None:
        """``changed``: the feed's float input of this output's shape, if it has one."""
        self.changes_input &= changed is not None
        if ref.shape != test.shape:
            self.nonfinite += max(ref.size, test.size)  # a candidate of another shape is broken outright
            return
        ref64, test64 = ref.astype(np.float64), test.astype(np.float64)
        ref_ok, test_ok = np.isfinite(ref64), np.isfinite(test64)
        if not (ref_ok.all() and test_ok.all()):
            self.reference_nonfinite += int(ref.size - ref_ok.sum())
            self.nonfinite += int((ref_ok & ~test_ok).sum())
            both = ref_ok & test_ok
            ref64, test64 = np.where(both, ref64, 0.0), np.where(both, test64, 0.0)
            ref, test = ref64, test64
        self._evidence(ref64, test64, padding, token_lengths)
        err = ref64 - test64
        self.dot += float((ref64 * test64).sum())
        self.ref_sq += float((ref64 ** 2).sum())
        self.test_sq += float((test64 ** 2).sum())
        self.err_sq += float((err ** 2).sum())
        if self.changes_input:
            change = ref64 - changed.astype(np.float64)
            self.change_sq += float(np.square(change[np.isfinite(change)]).sum())
        self.max_abs = max(self.max_abs, float(np.abs(err).max()) if err.size else 0.0)
        if ref.ndim == 2 and ref.shape[1] >= 2:
            self.class_like = True
            k = min(TOPK, ref.shape[1])
            self.rows += ref.shape[0]
            self.top1 += float((ref.argmax(1) == test.argmax(1)).sum())
            ref_top = np.argsort(-ref, axis=1)[:, :k]
            test_top = np.argsort(-test, axis=1)[:, :k]
            self.topk += float(sum(len(set(a) & set(b)) / k for a, b in zip(ref_top, test_top)))
        if self.group and len(self.group["dot"]) != (ref.shape[1] if ref.ndim >= 2 else 0):
            self.grouped, self.group = False, {}
        if self.grouped and ref.ndim >= 2 and 2 <= ref.shape[1] <= MAX_GROUPS:
            axes = tuple(i for i in range(ref.ndim) if i != 1)
            for key, part in (("dot", ref64 * test64), ("ref_sq", ref64 ** 2), ("test_sq", test64 ** 2),
                              ("err_sq", err ** 2)):
                self.group[key] = self.group.get(key, 0.0) + part.sum(axis=axes)

    def summary(self) -> dict:
        denom = np.sqrt(self.ref_sq * self.test_sq)
        out = {
            "cosine": float(self.dot / denom) if denom > 0 else (1.0 if self.err_sq == 0 else 0.0),
            "sqnr_db": _db(self.ref_sq, self.err_sq),
            "max_abs_error": self.max_abs,
        }
        if self.class_like and self.rows:
            out["top1_agreement"] = self.top1 / self.rows
            out[f"top{TOPK}_overlap"] = self.topk / self.rows
        blank = self.ctc_blank()
        out["kind"] = kind = self.kind(blank)
        if kind == "change":
            out["change_sqnr_db"] = _db(min(self.change_sq, self.ref_sq), self.err_sq)
        if kind == "curve":
            out["shape_sqnr_db"] = _db(self.shape_sq, self.err_sq)
        blank = blank if kind == "classes" else None
        agreement = self.decision_agreement(kind, blank)
        if agreement is not None:
            out["decision_agreement"] = agreement
        if kind == "classes" and self.samples:
            out["sequence_agreement"] = self.sequence_agreement(blank)
        if blank is not None:
            out["ctc_blank"] = blank
        if self.reference_nonfinite:
            out["reference_nonfinite"] = self.reference_nonfinite
        if self.nonfinite:
            out |= {"nonfinite": self.nonfinite, "sqnr_db": float("-inf"), "cosine": 0.0}
            for key in ("top1_agreement", "decision_agreement", "sequence_agreement"):
                if key in out:
                    out[key] = 0.0
        if self.group:
            g = self.group
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = np.where(g["ref_sq"] * g["test_sq"] > 0, g["dot"] / np.sqrt(g["ref_sq"] * g["test_sq"]), 1.0)
            sqnr = [_db(s, n) for s, n in zip(g["ref_sq"], g["err_sq"])]
            worst = np.argsort(sqnr)[:3]
            out["channels"] = len(sqnr)
            out["worst_channels"] = [{"channel": int(c), "sqnr_db": sqnr[c], "cosine": float(cos[c])} for c in worst]
        return out


def _blank_inside(decided: np.ndarray, blank: int) -> bool:
    """Whether a blank sits between two other decisions (CTC frames; a decoder's padding only trails)."""
    others = np.flatnonzero(decided != blank)
    return others.size >= 2 and others[-1] - others[0] + 1 > others.size


def _ctc_emitted(decided: np.ndarray, blank: int) -> np.ndarray:
    """Which frames emit a symbol in CTC's greedy decoding: not blank, and not a repeat of the frame before."""
    return (decided != blank) & np.concatenate([[True], decided[1:] != decided[:-1]])


def _ctc_decode(decided: np.ndarray, blank: int) -> list[int]:
    return decided[_ctc_emitted(decided, blank)].tolist()


def _edits(a: list[int], b: list[int]) -> int:
    """Levenshtein distance, one row of the table at a time."""
    row = np.arange(len(b) + 1)
    target = np.asarray(b)
    for i, symbol in enumerate(a, start=1):
        substituted = row[:-1] + (target != symbol)
        row = np.concatenate([[i], np.minimum(substituted, row[1:] + 1)])
        row = np.minimum.accumulate(row - np.arange(len(b) + 1)) + np.arange(len(b) + 1)  # insertions
    return int(row[-1])


def _ctc_decisive(decisions: np.ndarray, blank: int) -> np.ndarray:
    """The frames whose flip to their float runner-up would change the decoded sequence: a frame changes at
    most its own emission and the next frame's, so it is decisive where the symbols those two emit change."""
    top, runner = decisions[0], decisions[1]
    before = np.concatenate([[-1], top[:-1]])
    after = np.concatenate([top[1:], [blank]])

    def emitted(here: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # the (up to two) symbols, -1 for none
        own = (here != blank) & (here != before)
        next_own = (after != blank) & (after != here)
        first = np.where(own, here, np.where(next_own, after, -1))
        return first, np.where(own & next_own, after, -1)

    (a, b), (c, d) = emitted(top), emitted(runner)
    return (a != c) | (b != d)


@dataclass
class _IndexStats:
    """An integer or string output (token ids, class indices, a lookup table's labels): only exact agreement
    means anything — of the decoded text where integer ids are CTC frames already decided (module rules)."""

    agree: int = 0
    total: int = 0
    rows: list = field(default_factory=list)  # per sample of a [batch, frames] output: (float's ids, candidate's)
    tokenized: bool = False  # its positions are a token input's (a tagger's labels): never read as CTC frames

    def update(self, ref: np.ndarray, test: np.ndarray, token_lengths: set[int] = frozenset()) -> None:
        self.total += max(ref.size, test.size)
        if ref.shape == test.shape:
            self.agree += int((ref == test).sum())
            if ref.ndim == 2 and np.issubdtype(ref.dtype, np.integer) and \
                    sum(len(r) for r, _ in self.rows) < MARGIN_ROWS:
                self.rows.extend(zip(ref, test))
                self.tokenized |= ref.shape[1] in token_lengths

    def ctc_blank(self) -> int | None:
        """The blank id where the float ids read as CTC frames (as :meth:`_OutputStats.ctc_blank` — the most
        common id, the lowest or the highest seen, between two others in at least half the samples — and at
        least half of all frames: a recognizer's frames are mostly blank, 64–74% of a text line's), else None."""
        if self.tokenized or not self.rows:
            return None
        ids = np.concatenate([ref for ref, _ in self.rows])
        values, counts = np.unique(ids, return_counts=True)
        blank = int(values[counts.argmax()])
        if blank not in (int(values[0]), int(values[-1])) or 2 * counts.max() < ids.size:
            return None
        return blank if np.mean([_blank_inside(ref, blank) for ref, _ in self.rows]) >= 0.5 else None

    def summary(self) -> dict:
        blank = self.ctc_blank()
        if blank is None:
            return {"kind": "indices", "decision_agreement": self.agree / self.total if self.total else 1.0}
        decoded = [(_ctc_decode(ref, blank), _ctc_decode(test, blank)) for ref, test in self.rows]
        symbols = sum(len(ref) for ref, _ in decoded)
        return {"kind": "classes", "ctc_blank": blank,
                "decision_agreement": 1.0 - sum(_edits(ref, test) for ref, test in decoded) / max(symbols, 1),
                "sequence_agreement": float(np.mean([ref == test for ref, test in decoded]))}


@dataclass
class _SetStats:
    """An output whose length or order depends on values: items matched between the two models (module rules).
    The outputs are kept (sets are small) to read their :class:`SetForm` from every feed's."""

    pairs: list = field(default_factory=list)
    head: DetectionHead | None = None  # a raw detector output: its decoded detections are the items
    nonfinite: int = 0
    elementwise: _OutputStats | None = None  # a head with more than detections in it, held as a map too

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if self.head is None:
            self.pairs.append((ref, test))
            return
        self.nonfinite += int((~np.isfinite(test)).sum())
        self.pairs.extend(zip(self.head.items(ref), self.head.items(test)))
        if self.elementwise is not None:
            self.elementwise.update(ref, test)

    def summary(self) -> dict:
        form = SetForm.of([a for pair in self.pairs for a in pair]) if self.head is None else self.head.form
        items_ref = items_test = matched = 0
        nonfinite = self.nonfinite
        signal = error = 0.0
        for ref, test in self.pairs:
            counted = feed_sets(form, ref, test)
            items_ref, items_test, matched = items_ref + counted[0], items_test + counted[1], matched + counted[2]
            if np.isfinite(ref).all():  # figures where float is finite; a candidate's NaN there fails it
                nonfinite += int((~np.isfinite(test)).sum())
                error, signal = error + counted[3], signal + counted[4]
        total = items_ref + items_test
        nsr = worst_column_nsr(np.atleast_1d(error), np.atleast_1d(signal))
        out = {"kind": "detections", "decision_agreement": 2 * matched / total if total else 1.0,
               "sqnr_db": _db(1.0, nsr), "items_float": items_ref, "items_candidate": items_test}
        if self.elementwise is not None:
            out["map_sqnr_db"] = self.elementwise.summary()["sqnr_db"]
        if nonfinite:
            out |= {"nonfinite": nonfinite, "decision_agreement": 0.0, "sqnr_db": float("-inf")}
        return out


MetricFn = Callable[[list[dict[str, np.ndarray]], list], float]


def load_metric(spec: str) -> MetricFn:
    """Load a metric ``fn(outputs, feeds) -> float`` (higher is better) from ``pkg.module:function``."""
    return load_callable(spec, "--metric")


def padding_of(inputs) -> np.ndarray | None:
    """The padded positions ([batch, positions], True = padding) of a feed's token sequence, or None.

    From an integer input of rank 2: an attention mask (named ``*mask*``, values 0/1) pads where it is 0;
    else the input with the most distinct values (the token ids) pads where its trailing run of one value
    (its last token repeated: the pad id) is at least 2 long and does not fill the whole row."""
    tokens = {name: np.asarray(value) for name, value in inputs.items()
              if np.asarray(value).ndim == 2 and (np.issubdtype(np.asarray(value).dtype, np.integer)
                                                  or np.asarray(value).dtype == bool)}
    masks = [v for name, v in tokens.items() if "mask" in name.lower() and set(np.unique(v).tolist()) <= {0, 1}]
    if masks:
        padding = masks[0] == 0
        return padding if padding.any() else None
    if not tokens:
        return None
    ids = max(tokens.values(), key=lambda v: np.unique(v).size)
    trailing = np.flip(np.cumprod(np.flip(ids == ids[:, -1:], 1), 1), 1).astype(bool)
    run = trailing.sum(1)
    trailing[(run < 2) | (run == ids.shape[1])] = False
    return trailing if trailing.any() else None


def _names_features(name: str) -> bool:
    """Whether an output's name says it is a hidden state or features (module rules)."""
    return any(word in name.lower() for word in ("hidden", "embed", "feature"))


def open_axis_outputs(model: onnx.ModelProto | str | os.PathLike) -> frozenset[str]:
    """The outputs whose last axis the model declares by a symbol or leaves unknown (module rules); ``model``: a
    file, or its graph already read (:func:`edgeq.model_io.graph_only`)."""
    opened = set()
    for output in graph_only(model).graph.output:
        tensor = output.type.tensor_type
        if tensor.HasField("shape") and len(tensor.shape.dim) >= 2 and not tensor.shape.dim[-1].HasField("dim_value"):
            opened.add(output.name)
    return frozenset(opened)


def feature_outputs(model: onnx.ModelProto | str | os.PathLike) -> frozenset[str]:
    """The outputs a normalized model's metadata records as made by a normalization (module rules); ``model``:
    a file, or its graph already read (:func:`edgeq.model_io.graph_only`)."""
    recorded = next((p.value for p in graph_only(model).metadata_props if p.key == FEATURES_KEY), "[]")
    return frozenset(json.loads(recorded))


@dataclass(frozen=True)
class OutputHints:
    """What a model's graph says about reading its outputs: which are sets of items
    (:func:`edgeq.detections.set_outputs`), which a normalization made (:func:`feature_outputs`),
    and which declare their last axis by a symbol (:func:`open_axis_outputs`)."""
    sets: Mapping[str, frozenset[int] | None] = field(default_factory=dict)  # with the lengths TopKs gave
    features: frozenset[str] = frozenset()
    open_axes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, model: onnx.ModelProto | str | os.PathLike) -> OutputHints:
        """``model``: a file, or its graph already read (:func:`edgeq.model_io.graph_only`)."""
        graph = graph_only(model)
        return cls(set_outputs(graph), feature_outputs(graph), open_axis_outputs(graph))


class FidelityMeter:
    """Feed it (reference outputs, candidate outputs) per feed; ask for the summary at the end."""

    def __init__(self, output_names: list[str], keep_for_metric: bool = False, hints: OutputHints = OutputHints()):
        self.names = output_names
        self.hints = hints  # the model's own word on its outputs; their names say the rest
        self.stats: dict = {}
        self.keep = keep_for_metric
        self.ref_outputs: list[dict] = []
        self.test_outputs: list[dict] = []
        self.feeds: list = []
        self.count = 0

    def _stats_for(self, name: str, reference: np.ndarray):
        """What one output's figures are kept in: an item set, a float output's stats, or an integer's."""
        if name in self.hints.sets and holds_items(self.hints.sets[name], reference):
            return _SetStats()
        head = DetectionHead.of(reference)
        if head is not None:
            return _SetStats(head=head, elementwise=_OutputStats() if head.extra else None)
        if not np.issubdtype(reference.dtype, np.floating):
            return _IndexStats()
        return _OutputStats(named_logits="logit" in name.lower(),
                            named_features=name in self.hints.features or _names_features(name),
                            open_last=name in self.hints.open_axes)

    def update(self, ref: list[np.ndarray], test: list[np.ndarray], feed=None) -> None:
        self.count += 1
        padding = padding_of(feed.inputs) if feed is not None else None
        token_lengths = {np.shape(v)[1] for v in feed.inputs.values() if np.ndim(v) == 2 and
                         np.issubdtype(np.asarray(v).dtype, np.integer)} if feed is not None else set()
        batches = {np.shape(v)[0] for v in feed.inputs.values() if np.ndim(v)} if feed is not None else set()
        signals = [np.asarray(v) for v in feed.inputs.values() if np.ndim(v) >= 2 and
                   np.issubdtype(np.asarray(v).dtype, np.floating)] if feed is not None else []
        for name, r, t in zip(self.names, ref, test):
            changed = next((v for v in signals if v.shape == np.shape(r)), None)
            if np.ndim(r) == np.ndim(t) == 3 and r.shape[1] in batches and r.shape[0] not in batches:  # [T, batch, C]
                r, t, changed = np.swapaxes(r, 0, 1), np.swapaxes(t, 0, 1), None
            if name not in self.stats:
                self.stats[name] = self._stats_for(name, r)
            if isinstance(self.stats[name], _OutputStats):
                self.stats[name].update(np.asarray(r), np.asarray(t), padding, token_lengths, changed)
            elif isinstance(self.stats[name], _IndexStats):
                self.stats[name].update(np.asarray(r), np.asarray(t), token_lengths)
            else:
                self.stats[name].update(np.asarray(r), np.asarray(t))
        if self.keep:
            self.ref_outputs.append(dict(zip(self.names, ref)))
            self.test_outputs.append(dict(zip(self.names, test)))
            self.feeds.append(feed)

    def summary(self, metric: MetricFn | None = None) -> dict:
        outputs = {n: s.summary() for n, s in self.stats.items()
                   if not isinstance(s, _OutputStats) or s.ref_sq or s.err_sq or s.nonfinite}
        result = {"feeds": self.count, "outputs": outputs,
                  "nonfinite_outputs": sorted(n for n, o in outputs.items() if o.get("nonfinite"))}
        if metric is not None:
            ref_value = _call_metric(metric, self.ref_outputs, self.feeds)
            test_value = _call_metric(metric, self.test_outputs, self.feeds)
            result["metric"] = {"float": ref_value, "candidate": test_value, "drop": ref_value - test_value}
        return result


def _call_metric(metric: MetricFn, outputs: list[dict], feeds: list) -> float:
    name = getattr(metric, "__name__", "the metric")
    try:
        raw = metric(outputs, feeds)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 — user code: any failure is theirs to fix
        raise UserError(f"--metric {name} raised {type(exc).__name__}: {first_line(exc) or 'no message'}",
                        "fix the metric: it gets fn(outputs, feeds), outputs a list of {output name: array} per "
                        "feed, feeds with .inputs and .extras (arrays in the feed files that are not inputs)") from None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value):
        raise UserError(f"--metric {name} returned {str(raw)[:60]!r}, not a finite number",
                        "return a float, higher is better")
    return value


def disagreement(output: dict) -> float:
    """How far one output is from the reference, by its kind: the share of disagreeing decisions (indices,
    classes, logits: argmax or exact; scores, segments: 1 − IoU), else 1 − cosine."""
    if "decision_agreement" in output:
        return 1.0 - output["decision_agreement"]
    return 1.0 - output["cosine"]


def worst_sqnr(summary: dict) -> float:
    """The lowest output SQNR (dB) of a fidelity summary (integer outputs have none)."""
    return min((o["sqnr_db"] for o in summary["outputs"].values() if "sqnr_db" in o), default=float("inf"))


def accuracy_drop(summary: dict) -> float:
    """The drop a ``--max-drop`` budget is checked against: the user metric's drop when given, else the worst
    output's :func:`disagreement`."""
    if "metric" in summary:
        return summary["metric"]["drop"]
    return max((disagreement(o) for o in summary["outputs"].values()), default=0.0)


def compare_models(runtime, ref_path, test_path, feeds, metric=None, limit: int | None = None,
                   reference: list[list[np.ndarray]] | None = None, hints: OutputHints | None = None) -> dict:
    """Run two model files in ``runtime`` on the same feeds (the first ``limit`` of them, if given) and
    summarize how far the second's outputs are from the first's (``reference``: the first's outputs per feed,
    already computed: it is not run again; ``hints``: the first's :class:`OutputHints`, if known)."""
    test = runtime.session(test_path)
    ref = runtime.session(ref_path) if reference is None else None
    names = ref.output_names if ref is not None else test.output_names
    meter = FidelityMeter(names, keep_for_metric=metric is not None, hints=hints or OutputHints.of(ref_path))
    for index, feed in enumerate(feeds):
        if index == limit:
            break
        expected = reference[index] if reference is not None else ref.run(feed.inputs)
        meter.update(expected, test.run(feed.inputs), feed)
    return meter.summary(metric)


def reference_outputs(runtime, path, feeds, max_bytes: int) -> list[list[np.ndarray]] | None:
    """A model's outputs on every feed, to compare many candidates against; None when they would hold more
    than ``max_bytes``."""
    session, outputs, size = runtime.session(path), [], 0
    for feed in feeds:
        outputs.append(session.run(feed.inputs))
        size += sum(np.asarray(o).nbytes for o in outputs[-1])
        if size > max_bytes:
            return None
    return outputs
