"""Initial alignment of an atlas onto a scan: the translation elastix starts from.

Why: aligning image centres, or body centres of gravity, is off by up to half the difference in
scanned length (OpenKBP kbp_001 onto kbp_004: 37 and 62 mm craniocaudally), more than elastix's
affine stage recovers. ``"search"`` tries craniocaudal offsets, each with the in-plane centres of
the common body slab aligned, and keeps the best NCC on coarse images (there: 2 mm off). The
atlas is shifted by that translation (its origin moves) before a registration method starts,
with elastix's own initialisation off.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from fadal.amplify.geometry import OUTSIDE, body_z_range, like, ncc, world_points, world_z
from fadal.config import RegistrationConfig


def image_centre(img: sitk.Image) -> np.ndarray:
    """World coordinates of the centre of an image's field of view."""
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    half = (np.asarray(img.GetSize()) - 1) / 2.0 * np.asarray(img.GetSpacing())
    return np.asarray(img.GetOrigin()) + d @ half


def coarse(arr: np.ndarray, ref: sitk.Image, mm: float) -> sitk.Image:
    """Block-average to about ``mm`` voxels (anti-aliased, unlike plain resampling)."""
    factors = [max(1, int(round(mm / s))) for s in ref.GetSpacing()]
    return sitk.BinShrink(like(arr.astype(np.float32), ref), factors)


def initial_translation(fixed: sitk.Image, moving: sitk.Image, fixed_arr: np.ndarray, moving_arr: np.ndarray,
                        fixed_body: np.ndarray, moving_body: np.ndarray,
                        cfg: RegistrationConfig) -> np.ndarray:
    """Translation ``t`` (mm, world) such that fixed point ``x`` shows the anatomy of moving point ``x + t``.

    ``*_arr`` are the shifted intensities (air = 0), ``*_body`` the body masks (arrays in z, y, x).
    ``cfg.initialization``: ``"geometric_center"`` (image centres), ``"center_of_gravity"`` (body
    centres) or ``"search"``: for craniocaudal offsets ``tz`` every ``cfg.init_step_mm`` over all
    placements where the shorter scanned body length (:func:`body_z_range`) lies within the longer
    one (give or take a tenth of the shorter length), the in-plane shift aligns the centres of the
    body slabs that overlap at that ``tz``. Each candidate (and the centre-of-gravity one) is scored
    by NCC on ``cfg.init_coarse_mm`` block-averaged images, in the union of both bodies *within the
    common craniocaudal slab only* (outside it one scan has no data, or padding that looks like air,
    and scoring it would pull the shorter scan towards the widest part of the longer body), times
    the common length over the shorter length: NCC alone favours small overlaps that leave out
    whatever differs between two subjects (measured on phantom pairs: 45 mm off). The best
    candidate wins. Made for scans of the same body region (a site's atlases and targets); an
    empty body mask falls back to the image centres.
    """
    geometric = image_centre(moving) - image_centre(fixed)
    if cfg.initialization == "geometric_center" or not fixed_body.any() or not moving_body.any():
        return geometric
    pf, pm = world_points(fixed_body, fixed), world_points(moving_body, moving)
    cog = pm.mean(0) - pf.mean(0)
    if cfg.initialization == "center_of_gravity":
        return cog

    (f0, f1), (m0, m1) = body_z_range(fixed_body, fixed), body_z_range(moving_body, moving)
    short = min(f1 - f0, m1 - m0)

    def common(tz: float) -> tuple[float, float]:
        return max(f0, m0 - tz), min(f1, m1 - tz)

    def candidate(tz: float) -> np.ndarray | None:
        z_lo, z_hi = common(tz)
        sf = pf[(pf[:, 2] >= z_lo) & (pf[:, 2] <= z_hi)]
        sm = pm[(pm[:, 2] >= z_lo + tz) & (pm[:, 2] <= z_hi + tz)]
        return np.array([*(sm[:, :2].mean(0) - sf[:, :2].mean(0)), tz]) if len(sf) and len(sm) else None

    lo, hi = sorted((m0 - f0, m1 - f1))
    grid = np.arange(lo - 0.1 * short, hi + 0.1 * short + 1e-6, cfg.init_step_mm)
    candidates = [cog, *(c for c in map(candidate, grid) if c is not None)]

    fc = coarse(fixed_arr, fixed, cfg.init_coarse_mm)
    mc = coarse(moving_arr, moving, cfg.init_coarse_mm)
    mbc = coarse(moving_body, moving, cfg.init_coarse_mm)
    fca = sitk.GetArrayFromImage(fc)
    fbody = sitk.GetArrayFromImage(coarse(fixed_body, fixed, cfg.init_coarse_mm)) > 0.5
    fz = world_z(fc)

    def score(t: np.ndarray) -> float:
        z_lo, z_hi = common(t[2])
        if z_hi - z_lo < 0.5 * short:
            return -np.inf
        tr = sitk.TranslationTransform(3, [float(v) for v in t])
        arr = sitk.GetArrayFromImage(sitk.Resample(mc, fc, tr, sitk.sitkLinear, OUTSIDE, sitk.sitkFloat32))
        mbody = sitk.GetArrayFromImage(sitk.Resample(mbc, fc, tr, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
        m = (fbody | mbody) & (arr >= 0) & (fz >= z_lo) & (fz <= z_hi)
        return ncc(fca, arr, m) * (z_hi - z_lo) / short

    def best() -> tuple[np.ndarray, float]:
        vals = np.array([-np.inf if np.isnan(v) else v for v in scores])
        return candidates[int(np.argmax(vals))], float(vals.max())

    scores = [score(t) for t in candidates]
    # Refine the craniocaudal offset below the grid step: half, then quarter steps either side.
    for step in (cfg.init_step_mm / 2, cfg.init_step_mm / 4):
        top = best()[0]
        for c in (candidate(top[2] - step), candidate(top[2] + step)):
            if c is not None:
                candidates.append(c)
                scores.append(score(c))
    top, value = best()
    return top if np.isfinite(value) else cog
