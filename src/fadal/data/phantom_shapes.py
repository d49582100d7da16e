"""The phantom's shape primitives and smooth random fields, in anatomy coordinates (mm, LPS axes, origin at
the body centre). Every shape is evaluated on a flat array of points ``q`` (3, n) and returns a mask (n,)."""

from __future__ import annotations

import math

import numpy as np


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx from angles in degrees."""
    ax, ay, az = np.radians([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def _in_box(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Flat indices of the points inside an axis-aligned box (a cheap pre-filter for every shape)."""
    sel = (q[0] >= lo[0]) & (q[0] <= hi[0])
    sel &= (q[1] >= lo[1]) & (q[1] <= hi[1])
    sel &= (q[2] >= lo[2]) & (q[2] <= hi[2])
    return np.flatnonzero(sel)


def ellipsoid(q: np.ndarray, center, axes, rot: np.ndarray | None = None, power: float = 2.0) -> np.ndarray:
    """Boolean mask of a (super-)ellipsoid ``sum |local/axes|^power <= 1``; ``local = rot.T (q - center)``."""
    center = np.asarray(center, dtype=np.float32)
    axes = np.asarray(axes, dtype=np.float32)
    # Bounding radius: an ellipsoid fits in the sphere of its largest axis, a boxier one in sqrt(3) x that.
    reach = float(axes.max()) * (3 ** 0.5 if power > 2 else 1.0)
    mask = np.zeros(q.shape[1], dtype=bool)
    idx = _in_box(q, center - reach, center + reach)
    if idx.size == 0:
        return mask
    local = q[:, idx] - center[:, None]
    if rot is not None:
        local = rot.T.astype(np.float32) @ local
    local = np.abs(local / axes[:, None])
    if power == 2.0:
        r = (local * local).sum(axis=0)
    else:
        r = (local ** power).sum(axis=0)
    mask[idx[r <= 1.0]] = True
    return mask


def tube(q: np.ndarray, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean mask of a tube of varying radius around a polyline (``points``: (n, 3), ``radii``: (n,))."""
    points = np.asarray(points, dtype=np.float32)
    radii = np.asarray(radii, dtype=np.float32)
    mask = np.zeros(q.shape[1], dtype=bool)
    rmax = float(radii.max())
    idx = _in_box(q, points.min(axis=0) - rmax, points.max(axis=0) + rmax)
    if idx.size == 0:
        return mask
    sub = q[:, idx]
    inside = np.zeros(idx.size, dtype=bool)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        ab = b - a
        lo = np.minimum(a, b) - max(ra, rb)
        hi = np.maximum(a, b) + max(ra, rb)
        near = np.flatnonzero((sub[0] >= lo[0]) & (sub[0] <= hi[0]) & (sub[1] >= lo[1]) & (sub[1] <= hi[1])
                              & (sub[2] >= lo[2]) & (sub[2] <= hi[2]))
        if near.size == 0:
            continue
        ap = sub[:, near] - a[:, None]
        t = np.clip((ab @ ap) / float(ab @ ab), 0.0, 1.0)
        d = ap - ab[:, None] * t
        r = ra + (rb - ra) * t
        inside[near[(d * d).sum(axis=0) <= r * r]] = True
    mask[idx[inside]] = True
    return mask


def catmull_rom(points: np.ndarray, per_segment: int = 5) -> np.ndarray:
    """Smooth curve through ``points`` (n, k) -> ((n-1)*per_segment + 1, k)."""
    p = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for t in np.linspace(0.0, 1.0, per_segment, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(points[-1])
    return np.asarray(out)


def random_modes(rng: np.random.Generator, n: int, wavelength: tuple[float, float], amplitude: float,
                  dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random plane waves: wave vectors (n, 3), phases (n,), amplitudes (n, dims)."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = direction * (2 * np.pi / rng.uniform(*wavelength, size=(n, 1)))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    amp = rng.normal(size=(n, dims)) * (amplitude / math.sqrt(n))
    return k.astype(np.float32), phase.astype(np.float32), amp.astype(np.float32)


def eval_modes(q: np.ndarray, modes) -> np.ndarray:
    """The sum of the plane waves of :func:`random_modes` at every point: (dims, n)."""
    k, phase, amp = modes
    out = np.zeros((amp.shape[1], q.shape[1]), dtype=np.float32)
    for kk, ph, aa in zip(k, phase, amp):
        s = np.sin(kk @ q + ph)
        out += aa[:, None] * s[None, :]
    return out
