"""Joint label fusion weights (Wang, Suh, Das, Pluta, Craige & Yushkevich, IEEE TPAMI 2013).

Locally weighted voting gives each atlas a weight from its own patch similarity to the target, so two
atlases that make the *same* mistake (registered alike, or alike in anatomy) outvote a third that is
right. Joint label fusion instead minimises the expected error of the weighted vote, which depends on
how the atlases' errors co-occur: with ``d_i(y) = |A_i(y) - T(y)| / sigma`` the intensity difference
of warped atlas ``i`` to the target, the pairwise matrix

    M_x(i, j) = (mean_{y in patch(x)} d_i(y) d_j(y)) ** beta   (+ alpha on the diagonal)

estimates how likely atlases ``i`` and ``j`` both err at ``x``, and the weights are
``w_x = M_x^{-1} 1 / (1^T M_x^{-1} 1)`` (they sum to 1 and may be negative: an atlas correlated with
another's error corrects it). Vectorised: the ``n (n + 1) / 2`` patch means are box filters over the
volume; the ``n x n`` systems are solved in one batched call, only where the atlases' labels differ
(elsewhere every weighting that sums to 1 gives the same vote). ANTs' ``antsJointFusion`` also searches
the neighbourhood for the best-matching patch; that search is left out here (the registrations are dense).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: HU range compared (as in locally weighted voting): beyond it differences say little.
HU_RANGE = (-1000.0, 1500.0)


def patch_size(spacing_zyx: Sequence[float], radius_mm: float) -> tuple[int, ...]:
    """Box-filter size per array axis: ``2 r + 1`` voxels with ``r = round(radius_mm / spacing)`` (>= 1)."""
    return tuple(2 * max(1, int(round(radius_mm / float(s)))) + 1 for s in spacing_zyx)


def joint_weights(target_hu: np.ndarray, atlas_hu: Sequence[np.ndarray], where: np.ndarray,
                  spacing_zyx: Sequence[float], radius_mm: float = 5.0, sigma_hu: float = 30.0,
                  alpha: float = 0.1, beta: float = 2.0) -> np.ndarray:
    """Joint fusion weights (n, k) of the ``n`` atlases at the ``k`` voxels where ``where`` is true.

    ``target_hu`` and each of ``atlas_hu`` lie on one grid (HU, clipped to :data:`HU_RANGE`);
    ``where`` selects the voxels to solve for. Rows sum to 1 per voxel. One atlas: weight 1.
    """
    n = len(atlas_hu)
    k = int(where.sum())
    if n == 1 or k == 0:
        return np.ones((n, k), dtype=np.float32)
    # Only the box around the voxels asked for (plus the patch) is filtered.
    size = patch_size(spacing_zyx, radius_mm)
    idx = np.argwhere(where)
    box = tuple(slice(max(int(lo) - s, 0), int(hi) + s + 1) for lo, hi, s in zip(idx.min(0), idx.max(0), size))
    t = np.clip(np.asarray(target_hu, dtype=np.float32)[box], *HU_RANGE)
    d = [np.abs(np.clip(np.asarray(a, dtype=np.float32)[box], *HU_RANGE) - t) / np.float32(sigma_hu)
         for a in atlas_hu]
    inside = where[box]
    m = np.empty((k, n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i, n):
            v = ndimage.uniform_filter(d[i] * d[j], size=size, mode="nearest")[inside]
            m[:, i, j] = m[:, j, i] = np.power(np.maximum(v, 0.0), beta)
    m += alpha * np.eye(n)
    w = np.linalg.solve(m, np.ones((k, n, 1)))[..., 0]  # (k, n)
    w /= w.sum(axis=1, keepdims=True)
    return w.T.astype(np.float32)
