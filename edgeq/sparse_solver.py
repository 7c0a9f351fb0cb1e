"""2:4 pruning of one layer, viewed as ``rows`` [outputs, features] with groups of four consecutive features.

Three tools, each deterministic:
- ``prune_magnitude``: keep the two largest magnitudes of every four.
- ``prune_reconstruct``: SparseGPT-style optimal brain surgeon on the layer's input Gram matrix H = Σ xᵀx
  (no training). Columns are visited left to right; at the start of each group of four the two weights whose
  removal costs least (w² / [H⁻¹]ᵢᵢ²) are pruned, and each pruned column's error is spread over the columns
  not yet visited through the upper Cholesky factor of H⁻¹, so the layer's outputs on the calibration data stay
  close to float (:mod:`edgeq.quant.obs`); inputs that never fire get weight 0.
- ``search_permutation``: an order of the features' groups-of-four channels that keeps more magnitude under
  2:4. Greedy parallel swaps: each round pairs groups at random (seeded) and applies, per pair, the best
  single-channel swap if it gains; the number of rounds follows a fixed work budget, not the clock, so the same
  weights give the same permutation.
"""

from __future__ import annotations

import numpy as np

from edgeq.quant.obs import compensate, dead_features
from edgeq.sparse24 import GROUP, KEPT, kept_magnitude, magnitude_mask

PERMUTE_WORK = 1e9  # element operations spent on one layer's permutation search
PERMUTE_MAX_ROUNDS = 400
PERMUTE_PATIENCE = 12  # rounds without any gain before the search stops


def prune_magnitude(rows: np.ndarray) -> np.ndarray:
    return np.where(magnitude_mask(rows), rows, 0).astype(rows.dtype)


def prune_reconstruct(rows: np.ndarray, gram: np.ndarray) -> np.ndarray:
    pruned = np.zeros(rows.shape, dtype=bool)
    row_index = np.arange(rows.shape[0])[:, None]

    def settle(column: int, block: np.ndarray, inverse: np.ndarray, i: int) -> np.ndarray:
        if i % GROUP == 0:  # obs.BLOCK is a multiple of GROUP: a group never straddles two blocks
            saliency = block[:, i:i + GROUP] ** 2 / np.diag(inverse)[i:i + GROUP] ** 2
            drop = np.argsort(saliency, axis=1, kind="stable")[:, :GROUP - KEPT]
            pruned[row_index, column + drop] = True
        return np.where(pruned[:, column], 0.0, block[:, i])

    w = compensate(np.where(dead_features(gram), 0.0, rows), gram, settle)  # inputs that never fire: 0
    w[pruned] = 0.0
    return w.astype(rows.dtype)


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
