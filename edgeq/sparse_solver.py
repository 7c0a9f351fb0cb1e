"""2:4 pruning of one layer, viewed as ``rows`` [outputs, features] with groups of four consecutive features.

Three tools, each deterministic:
- ``prune_magnitude``: keep the two largest magnitudes of every four.
- ``prune_reconstruct``: SparseGPT-style optimal brain surgeon on the layer's input Gram matrix H = Σ xᵀx
  (no training). Columns are visited left to right; at the start of each group of four the two weights whose
  removal costs least (w² / [H⁻¹]ᵢᵢ²) are pruned, and each pruned column's error is spread over the columns
  not yet visited through the upper Cholesky factor of H⁻¹, so the layer's outputs on the calibration data stay
  close to float. H is damped by 1% of its mean diagonal; inputs that never fire get weight 0.
- ``search_permutation``: an order of the features' groups-of-four channels that keeps more magnitude under
  2:4. Greedy parallel swaps: each round pairs groups at random (seeded) and applies, per pair, the best
  single-channel swap if it gains; the number of rounds follows a fixed work budget, not the clock, so the same
  weights give the same permutation.

``output_error`` is the relative output error ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration data, from H alone.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack  # numpy exposes no triangular inverse

from edgeq.sparse24 import GROUP, KEPT, kept_magnitude, magnitude_mask

DAMP = 0.01
BLOCK = 128  # columns solved together; a multiple of GROUP
PERMUTE_WORK = 1e9  # element operations spent on one layer's permutation search
PERMUTE_MAX_ROUNDS = 400
PERMUTE_PATIENCE = 12  # rounds without any gain before the search stops


def prune_magnitude(rows: np.ndarray) -> np.ndarray:
    return np.where(magnitude_mask(rows), rows, 0).astype(rows.dtype)


def _inverse_upper_factor(h: np.ndarray) -> np.ndarray:
    """Upper triangular U with UᵀU = H⁻¹, without forming H⁻¹: factor the reversed H (H = ŨŨᵀ with Ũ upper)
    and invert the triangle (U = Ũ⁻¹) — a third of the work of inverting H and factoring the inverse."""
    reversed_factor = np.linalg.cholesky(h[::-1, ::-1])
    inverse, info = lapack.dtrtri(np.ascontiguousarray(reversed_factor[::-1, ::-1]), lower=0)
    if info:
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK info {info})")
    return inverse


def prune_reconstruct(rows: np.ndarray, gram: np.ndarray) -> np.ndarray:
    w = rows.astype(np.float64)  # a fresh copy, updated in place
    h = gram.astype(np.float64)
    features = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(features)] += DAMP * np.mean(np.diag(h))
    hinv = _inverse_upper_factor(h)
    pruned = np.zeros_like(w, dtype=bool)
    row_index = np.arange(w.shape[0])[:, None]
    for start in range(0, features, BLOCK):
        stop = min(start + BLOCK, features)
        block, inv = w[:, start:stop].copy(), hinv[start:stop, start:stop]
        errors = np.zeros_like(block)
        for i in range(stop - start):
            if i % GROUP == 0:
                saliency = block[:, i:i + GROUP] ** 2 / np.diag(inv)[i:i + GROUP] ** 2
                drop = np.argsort(saliency, axis=1, kind="stable")[:, :GROUP - KEPT]
                pruned[row_index, start + i + drop] = True
            column = block[:, i]
            kept = np.where(pruned[:, start + i], 0.0, column)
            error = (column - kept) / inv[i, i]
            block[:, i:] -= np.outer(error, inv[i, i:])
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:stop] = block
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    w[pruned] = 0.0
    return w.astype(rows.dtype)


def output_error(rows: np.ndarray, pruned: np.ndarray, gram: np.ndarray) -> float:
    h = gram.astype(np.float64)
    w = rows.astype(np.float64)
    delta = w - pruned.astype(np.float64)
    reference = float(((w @ h) * w).sum())
    return float(((delta @ h) * delta).sum()) / reference if reference > 0 else 0.0


def search_permutation(magnitudes: np.ndarray, seed: int = 0) -> np.ndarray:
    """A permutation of the columns of ``magnitudes`` [rows, channels] (channels a multiple of 4) that keeps
    more of their sum under 2:4 than the identity; ``perm[i]`` is the original channel placed at ``i``."""
    rows, channels = magnitudes.shape
    groups = channels // GROUP
    perm = np.arange(channels)
    if groups < 2:
        return perm
    rng = np.random.default_rng(seed)
    current = np.abs(magnitudes).astype(np.float32)
    rounds = int(min(PERMUTE_MAX_ROUNDS, max(1, PERMUTE_WORK / (rows * channels * GROUP * GROUP * 2))))
    stale = 0
    for _ in range(rounds):
        order = rng.permutation(groups)[: groups // 2 * 2]
        left, right = order[0::2], order[1::2]
        grouped = current.reshape(rows, groups, GROUP)
        a, b = grouped[:, left], grouped[:, right]  # [rows, pairs, 4]
        base = kept_magnitude(a) + kept_magnitude(b)
        best_gain = np.zeros(len(left), dtype=np.float32)
        best_i = np.full(len(left), -1)
        best_j = np.full(len(left), -1)
        for i in range(GROUP):
            for j in range(GROUP):
                a2, b2 = a.copy(), b.copy()
                a2[..., i], b2[..., j] = b[..., j], a[..., i]
                gain = kept_magnitude(a2) + kept_magnitude(b2) - base
                better = gain > np.maximum(best_gain, 1e-6 * base)
                best_gain = np.where(better, gain, best_gain)
                best_i, best_j = np.where(better, i, best_i), np.where(better, j, best_j)
        swaps = np.flatnonzero(best_i >= 0)
        if len(swaps) == 0:
            stale += 1
            if stale >= PERMUTE_PATIENCE:
                break
            continue
        stale = 0
        x = left[swaps] * GROUP + best_i[swaps]
        y = right[swaps] * GROUP + best_j[swaps]
        perm[x], perm[y] = perm[y], perm[x].copy()
        current[:, x], current[:, y] = current[:, y], current[:, x].copy()
    return perm
