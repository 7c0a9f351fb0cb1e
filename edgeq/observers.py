"""Streaming range observers for activations (after ``torch/ao/quantization/observer.py``).

Each observer sees one batch at a time through ``update`` and decides a clipping range with ``range()``.
Memory is fixed per tensor whatever the number of batches: ``MinMaxObserver`` keeps two floats,
``HistogramObserver`` keeps ``bins`` counts over a range that grows by whole powers of two, merging old bins
exactly (no resampling error). The histogram then yields percentile, entropy (KL) or MSE ranges.

Ranges always include zero, so that zero is exactly representable (padding, ReLU).

Non-finite values (±inf, NaN: the log of a zero power in an audio front-end, say) are not part of any range:
observers skip them and count them (``nonfinite``); ``finite`` counts the values a range was decided from,
and a tensor with none has no range (``range()`` returns None) and stays float. So are values of magnitude
``SENTINEL`` or more: no activation reaches them, but an attention mask's "minus infinity" written as float32's
lowest value (−3.4e38, as Hugging Face models write it) does, and a range over it rounds every real value to 0.
"""

from __future__ import annotations

import numpy as np

LEVELS = 256  # 8-bit activations, asymmetric
SENTINEL = 1e30  # |x| from here on is a stand-in for infinity, not a value
HISTOGRAM_METHODS = ("percentile", "mse", "entropy")


class Observer:
    """Collects one tensor's values batch by batch (``update``); decides a range at the end (``range``)."""

    def __init__(self):
        self.finite = 0
        self.nonfinite = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or max(-lo, hi) >= SENTINEL:  # slow path where needed
            keep = np.isfinite(x) & (np.abs(x) < SENTINEL)
            self.nonfinite += int(x.size - keep.sum())
            x = x[keep]
            if not x.size:
                return
            lo, hi = float(x.min()), float(x.max())
        self.finite += int(x.size)
        self._update(x, lo, hi)

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float] | None:
        """The clipping range (containing 0), or None when no finite value was seen."""
        return self._range() if self.finite else None

    def _range(self) -> tuple[float, float]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    def __init__(self):
        super().__init__()
        self.lo, self.hi = np.inf, -np.inf

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def _range(self) -> tuple[float, float]:
        return min(self.lo, 0.0), max(self.hi, 0.0)


class HistogramObserver(Observer):
    """Fixed-bin histogram over [lo, lo + bins·width); grows by merging 2^k neighbouring bins."""

    def __init__(self, method: str = "percentile", bins: int = 2048, percentile: float = 99.999):
        super().__init__()
        self.method = method
        self.bins = bins
        self.percentile = percentile
        self.counts = np.zeros(bins, dtype=np.float64)
        self.lo = 0.0
        self.width = 0.0
        self.seen_lo, self.seen_hi = np.inf, -np.inf

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
        self.seen_lo, self.seen_hi = min(self.seen_lo, lo), max(self.seen_hi, hi)
        lo, hi = self._seen_range()
        if self.width == 0.0:
            self.lo = lo
            self.width = max(hi - lo, 1e-12) / self.bins
        else:
            self._grow_to(lo, hi)
        index = np.clip(((x - self.lo) / self.width).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)

    def _seen_range(self) -> tuple[float, float]:
        """Smallest and largest finite value seen, widened to contain 0."""
        return min(self.seen_lo, 0.0), max(self.seen_hi, 0.0)

    def _grow_to(self, lo: float, hi: float) -> None:
        shift = max(0, int(np.ceil((self.lo - lo) / self.width)))  # new bins needed below, in old widths
        span = shift + int(np.ceil((hi - self.lo) / self.width))  # total old widths to cover
        if shift == 0 and span <= self.bins:
            return
        factor = 1 << int(np.ceil(np.log2(max(span / self.bins, 1.0))))
        if shift == 0 and factor == 1:
            return
        merged = (np.arange(self.bins) + shift) // factor
        self.counts = np.bincount(merged, weights=self.counts, minlength=self.bins)[: self.bins]
        self.lo -= shift * self.width
        self.width *= factor

    # range decisions -----------------------------------------------------------------------------
    def _range(self) -> tuple[float, float]:
        return self.range_by(self.method)

    def range_by(self, method: str) -> tuple[float, float]:
        """The range ``method`` decides from this histogram (one of HISTOGRAM_METHODS)."""
        lo, hi = {"percentile": self._percentile_range, "entropy": self._entropy_range,
                  "mse": self._mse_range}[method]()
        return min(lo, 0.0), max(hi, 0.0)

    def _edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    def _percentile_range(self) -> tuple[float, float]:
        cdf = np.cumsum(self.counts) / self.counts.sum()
        tail = (100.0 - self.percentile) / 100.0
        edges = self._edges()
        lo = edges[np.searchsorted(cdf, tail, side="left")]
        hi = edges[min(np.searchsorted(cdf, 1.0 - tail, side="left") + 1, self.bins)]
        true_lo, true_hi = self._seen_range()
        return max(lo, true_lo), min(hi, true_hi)

    def _folded(self) -> tuple[np.ndarray, float]:
        """|x| histogram with the same bin width, starting at zero."""
        centers = self.lo + self.width * (np.arange(self.bins) + 0.5)
        index = np.floor(np.abs(centers) / self.width).astype(np.int64)
        return np.bincount(index, weights=self.counts), self.width

    def _entropy_range(self) -> tuple[float, float]:
        """TensorRT's KL search on |x|: the clipping threshold whose 8-bit histogram diverges least."""
        hist, width = self._folded()
        true_lo, true_hi = self._seen_range()
        levels = LEVELS if true_lo >= 0.0 else LEVELS // 2
        n = len(hist)
        if n <= levels:
            return true_lo, true_hi
        best, best_t = np.inf, n
        for t in np.unique(np.linspace(levels, n, num=min(n - levels + 1, 256)).astype(np.int64)):
            sliced = hist[:t]
            p = sliced.copy()
            p[-1] += hist[t:].sum()  # outliers clip into the last bin
            # merge the t bins into `levels` chunks, then spread each chunk's mass over its non-empty bins
            starts = np.linspace(0, t, levels + 1).astype(np.int64)[:-1]
            nonzero = (sliced > 0).astype(np.float64)
            mass = np.add.reduceat(sliced, starts)
            used = np.add.reduceat(nonzero, starts)
            chunk = np.repeat(np.arange(levels), np.diff(np.append(starts, t)))
            q = np.where(nonzero > 0, (mass / np.maximum(used, 1))[chunk], 0.0)
            ps, qs = p / p.sum(), q / max(q.sum(), 1e-30)
            both = (ps > 0) & (qs > 0)
            kl = float(np.sum(ps[both] * np.log(ps[both] / qs[both])))
            if kl < best:
                best, best_t = kl, t
        threshold = best_t * width
        return max(true_lo, -threshold), min(true_hi, threshold)

    def _mse_range(self) -> tuple[float, float]:
        """Shrink [lo, hi] jointly; keep the range with the least expected 8-bit quantization error."""
        centers = self.lo + self.width * (np.arange(self.bins) + 0.5)
        true_lo, true_hi = self._seen_range()
        factors = np.linspace(0.05, 1.0, 96)
        lo = true_lo * factors[:, None]
        hi = true_hi * factors[:, None]
        scale = np.maximum(hi - lo, 1e-12) / (LEVELS - 1)
        zero = np.round(-lo / scale)
        q = np.clip(np.round(centers[None, :] / scale) + zero, 0, LEVELS - 1)
        err = ((q - zero) * scale - centers[None, :]) ** 2 @ self.counts
        best = int(np.argmin(err))
        return float(lo[best, 0]), float(hi[best, 0])


def make_observer(method: str, percentile: float = 99.999):
    if method == "minmax":
        return MinMaxObserver()
    return HistogramObserver(method, percentile=percentile)
