"""A deterministic synthetic multi-site abdominal CT phantom: FADAL's embedded default dataset.

Each subject is an abdomen built from smooth shapes (superellipses, ellipsoids, tubes) in continuous
world coordinates (ITK's LPS convention: +x patient left, +y posterior, +z superior), with per-subject
variation of body and organ size, position and rotation and a smooth random non-rigid deformation.
It is then rasterised at a site's scanner spacing over a fixed physical field of view, stored with
the site's direction matrix, blurred slightly (partial volume), given low-frequency inhomogeneity and
the scanner's noise, and finally mapped through the scanner's affine HU change.

:func:`make_phantom` writes one nnU-Net-style folder per site (``site_A``, ``site_B``, ...)::

    site_A/
      dataset.json   cases.json
      imagesTr/<case>_0000.nii.gz   labelsTr/<case>.nii.gz     (labeled + unlabeled; labels only for labeled)
      imagesTs/<case>_0000.nii.gz   labelsTs/<case>.nii.gz     (held-out test scans, all organs)

Every subject draws from its own generator seeded by ``(seed, site index, case index)``, so a
subject never depends on how many scans the other sites or splits hold.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fadal.data.io import write_image, write_json

__all__ = [
    "PHANTOM_LABELS",
    "PARTIAL_ANNOTATED",
    "FIELD_OF_VIEW_MM",
    "ScannerProfile",
    "DEFAULT_SCANNERS",
    "scanner_for_site",
    "site_letter",
    "make_subject",
    "make_phantom",
]

PHANTOM_LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_right": 3,
    "kidney_left": 4,
    "stomach": 5,
    "pancreas": 6,
    "aorta": 7,
}

#: Organs drawn on the labeled training scans of a partially annotated site (spleen, stomach and
#: pancreas were never drawn there; their voxels are written as background).
PARTIAL_ANNOTATED: tuple[str, ...] = ("liver", "kidney_right", "kidney_left", "aorta")

#: Physical field of view (x left-right, y anterior-posterior, z craniocaudal), in mm.
FIELD_OF_VIEW_MM: tuple[float, float, float] = (360.0, 280.0, 220.0)

_ORGANS: tuple[str, ...] = tuple(name for name in PHANTOM_LABELS if name != "background")
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_MIN_SIDE = 40  # voxels; spacing is capped so that no axis of the grid gets smaller than this


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and protocol differ from the others.

    ``hu = hu * hu_scale + hu_offset`` is applied to the finished scan (then clipped to the CT range,
    so air stays near -1000). ``contrast_boost_hu`` is the enhancement of the contrast phase: each
    tissue gains a tissue-specific fraction of it (aorta and renal cortex most, fat nothing).
    ``direction`` is the row-major 3x3 direction matrix of the stored volume (ITK convention).
    """

    name: str
    spacing_mm: tuple[float, float, float]
    noise_hu: float
    hu_scale: float = 1.0
    hu_offset: float = 0.0
    contrast_boost_hu: float = 0.0
    direction: tuple[float, ...] = _IDENTITY

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"scanner {self.name}: spacing_mm must be 3 positive numbers, got {self.spacing_mm}")
        if len(self.direction) != 9:
            raise ValueError(f"scanner {self.name}: direction must hold 9 numbers, got {len(self.direction)}")
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if not np.allclose(d @ d.T, np.eye(3), atol=1e-6):
            raise ValueError(f"scanner {self.name}: direction {self.direction} is not orthonormal")
        if self.noise_hu < 0 or self.hu_scale <= 0:
            raise ValueError(f"scanner {self.name}: noise_hu must be >= 0 and hu_scale > 0")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["spacing_mm"] = [float(v) for v in self.spacing_mm]
        data["direction"] = [float(v) for v in self.direction]
        return data


DEFAULT_SCANNERS: list[ScannerProfile] = [
    ScannerProfile(
        name="A: 4 mm isotropic, low noise, light venous contrast",
        spacing_mm=(4.0, 4.0, 4.0), noise_hu=10.0, hu_scale=1.0, hu_offset=0.0, contrast_boost_hu=30.0,
    ),
    ScannerProfile(
        name="B: 5 mm thick slices, high noise, native, +20 HU calibration offset",
        spacing_mm=(4.5, 4.5, 5.0), noise_hu=25.0, hu_scale=1.0, hu_offset=20.0, contrast_boost_hu=0.0,
    ),
    ScannerProfile(
        name="C: 3.5 mm slices, arterial contrast, x/y-flipped storage",
        spacing_mm=(3.75, 3.75, 3.5), noise_hu=15.0, hu_scale=1.05, hu_offset=0.0, contrast_boost_hu=170.0,
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    ),
]


def site_letter(index: int) -> str:
    """``0 -> 'A'``, ``1 -> 'B'``, ... (at most 26 sites)."""
    if not 0 <= index < 26:
        raise ValueError(f"site index {index} out of range: the phantom supports 1 to 26 sites")
    return chr(ord("A") + index)


def scanner_for_site(index: int) -> ScannerProfile:
    """The profile of site ``index``: the defaults for the first three, perturbed copies after that.

    The perturbation depends only on ``index`` (not on the phantom seed), so a site's scanner is stable.
    """
    base = DEFAULT_SCANNERS[index % len(DEFAULT_SCANNERS)]
    if index < len(DEFAULT_SCANNERS):
        return base
    rng = np.random.default_rng([7919, index])
    fov = np.asarray(FIELD_OF_VIEW_MM)
    spacing = np.asarray(base.spacing_mm) * rng.uniform(0.9, 1.12, 3)
    spacing = np.clip(spacing, fov / 96.0, fov / _MIN_SIDE)
    return dataclasses.replace(
        base,
        name=f"{site_letter(index)}: variant of {base.name.split(':')[0]}",
        spacing_mm=tuple(round(float(s), 3) for s in spacing),
        noise_hu=round(float(base.noise_hu * rng.uniform(0.7, 1.4)), 2),
        hu_scale=round(float(base.hu_scale * rng.uniform(0.97, 1.03)), 4),
        hu_offset=round(float(base.hu_offset + rng.uniform(-10.0, 10.0)), 2),
        contrast_boost_hu=round(float(max(0.0, base.contrast_boost_hu * rng.uniform(0.8, 1.2) + rng.uniform(-10, 10))), 1),
    )


# --------------------------------------------------------------------------------------------------
# Tissues: the painted classes, their native HU, their share of the contrast boost, and their label.
# --------------------------------------------------------------------------------------------------
_T_AIR, _T_FAT, _T_MUSCLE, _T_VISCERA, _T_CORTICAL, _T_CANCELLOUS, _T_DISC, _T_CSF, _T_VEIN, _T_ARTERY = range(10)
_T_LIVER, _T_SPLEEN = 10, 11
_T_KID_R_CORTEX, _T_KID_R_MEDULLA, _T_KID_L_CORTEX, _T_KID_L_MEDULLA = 12, 13, 14, 15
_T_STOMACH_WALL, _T_STOMACH_FLUID, _T_STOMACH_GAS = 16, 17, 18
_T_PANCREAS, _T_AORTA = 19, 20
_N_TISSUES = 21

_NATIVE_HU = np.zeros(_N_TISSUES, dtype=np.float32)
_ENHANCE = np.zeros(_N_TISSUES, dtype=np.float32)
_TISSUE_LABEL = np.zeros(_N_TISSUES, dtype=np.uint8)
for _t, _hu, _enh, _lab in [
    (_T_AIR, -1000, 0.0, 0), (_T_FAT, -100, 0.0, 0), (_T_MUSCLE, 50, 0.08, 0), (_T_VISCERA, -90, 0.0, 0),
    (_T_CORTICAL, 800, 0.0, 0), (_T_CANCELLOUS, 360, 0.05, 0), (_T_DISC, 90, 0.05, 0), (_T_CSF, 12, 0.0, 0),
    (_T_VEIN, 40, 0.18, 0), (_T_ARTERY, 40, 1.25, 0),
    (_T_LIVER, 60, 0.22, 1), (_T_SPLEEN, 50, 0.55, 2),
    (_T_KID_R_CORTEX, 35, 1.0, 3), (_T_KID_R_MEDULLA, 30, 0.35, 3),
    (_T_KID_L_CORTEX, 35, 1.0, 4), (_T_KID_L_MEDULLA, 30, 0.35, 4),
    (_T_STOMACH_WALL, 40, 0.3, 5), (_T_STOMACH_FLUID, 10, 0.0, 5), (_T_STOMACH_GAS, -990, 0.0, 5),
    (_T_PANCREAS, 40, 0.5, 6), (_T_AORTA, 40, 1.25, 7),
]:
    _NATIVE_HU[_t], _ENHANCE[_t], _TISSUE_LABEL[_t] = _hu, _enh, _lab
# Tissues that get the subject's per-organ HU jitter and the low-frequency inhomogeneity.
_SOFT_TISSUES = np.array([_T_MUSCLE, _T_LIVER, _T_SPLEEN, _T_KID_R_CORTEX, _T_KID_R_MEDULLA, _T_KID_L_CORTEX,
                          _T_KID_L_MEDULLA, _T_STOMACH_WALL, _T_PANCREAS, _T_AORTA, _T_VEIN, _T_ARTERY])


# --------------------------------------------------------------------------------------------------
# Geometry helpers (all in anatomy coordinates: mm, LPS axes, origin at the body centre)
# --------------------------------------------------------------------------------------------------
def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
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


def _ellipsoid(q: np.ndarray, center, axes, rot: np.ndarray | None = None, power: float = 2.0) -> np.ndarray:
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


def _tube(q: np.ndarray, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
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


def _catmull_rom(points: np.ndarray, per_segment: int = 5) -> np.ndarray:
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


def _random_modes(rng: np.random.Generator, n: int, wavelength: tuple[float, float], amplitude: float,
                  dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random plane waves: wave vectors (n, 3), phases (n,), amplitudes (n, dims)."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = direction * (2 * np.pi / rng.uniform(*wavelength, size=(n, 1)))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    amp = rng.normal(size=(n, dims)) * (amplitude / math.sqrt(n))
    return k.astype(np.float32), phase.astype(np.float32), amp.astype(np.float32)


def _eval_modes(q: np.ndarray, modes) -> np.ndarray:
    k, phase, amp = modes
    out = np.zeros((amp.shape[1], q.shape[1]), dtype=np.float32)
    for kk, ph, aa in zip(k, phase, amp):
        s = np.sin(kk @ q + ph)
        out += aa[:, None] * s[None, :]
    return out


# --------------------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------------------
def _sample_anatomy(rng: np.random.Generator) -> dict:
    """All random shape and appearance parameters of one subject (a fixed number of draws)."""
    u = rng.uniform

    def size(base, spread=0.10, axis_spread=0.05):
        base = np.asarray(base, dtype=float)
        return base * organ_scale * u(1 - spread, 1 + spread) * u(1 - axis_spread, 1 + axis_spread, base.size)

    def pos(base, sx, sy, jitter=10.0):
        base = np.asarray(base, dtype=float)
        return np.array([base[0] * sx, base[1] * sy, base[2]]) + u(-jitter, jitter, 3)

    a = {}
    body_scale = u(0.9, 1.1)
    organ_scale = 1.0  # read by size() at call time: the spine and vessels do not grow with the body
    sx = body_scale * u(0.96, 1.04)
    sy = body_scale * u(0.96, 1.04)
    a["body_axes"] = (155.0 * sx, 112.0 * sy)
    a["body_power"] = u(2.1, 2.5)
    a["fat_mm"] = u(8.0, 22.0) * body_scale
    a["muscle_mm"] = u(9.0, 14.0)
    a["body_rot"] = _rotation(u(-3, 3), u(-2, 2), u(-5, 5))
    a["body_shift"] = u(-4, 4, 3)
    a["deform"] = _random_modes(rng, 4, (200.0, 360.0), u(5.0, 8.0), 3)

    # Spine (y grows posteriorly), in scaled body coordinates.
    vb_y = 50.0 * sy
    a["vb_center"] = np.array([u(-3, 3), vb_y])
    a["vb_axes"] = size((22.0, 17.0), 0.06, 0.04)
    a["vertebra_period"] = u(32.0, 37.0)
    a["vertebra_phase"] = u(0.0, 40.0)
    a["rib_phase"] = u(0.0, 36.0)
    vb_front = vb_y - a["vb_axes"][1]

    # Vessels: aorta anterior-left of the spine, IVC anterior-right.
    r_aorta = u(9.0, 12.5)
    ax0 = u(12.0, 20.0)
    ay0 = vb_front - r_aorta - u(1.0, 4.0)
    zs = np.linspace(-260.0, 260.0, 14)
    a["aorta_line"] = np.stack([ax0 + 4.0 * np.sin(zs / 180.0 + u(0, 6.28)), ay0 + 3.0 * np.sin(zs / 150.0 + u(0, 6.28)), zs], 1)
    a["aorta_radius"] = r_aorta * (1.0 + 0.08 * (zs / 260.0))  # a little wider cranially
    a["aorta_bifurcation_z"] = u(-105.0, -85.0)
    a["ivc"] = (np.array([u(-28.0, -20.0), vb_front - u(8.0, 12.0)]), size((13.0, 10.0), 0.1, 0.05))

    # Organs: size follows the body a little (+-15 % in all), position follows it and jitters +-10 mm.
    organ_scale = body_scale ** 0.5

    a["liver_right"] = (pos((-72.0, 6.0, 42.0), sx, sy, 8.0), size((65.0, 70.0, 78.0), 0.09, 0.05),
                        _rotation(u(-6, 6), u(-6, 6), u(-8, 8)), u(2.3, 2.8))
    a["liver_left"] = (pos((10.0, -42.0, 62.0), sx, sy, 8.0), size((58.0, 28.0, 34.0), 0.1, 0.06),
                       _rotation(u(-5, 5), u(-8, 8), u(-10, 10)))
    a["spleen"] = (pos((88.0, 44.0, 65.0), sx, sy, 7.0), size((24.0, 52.0, 46.0), 0.1, 0.05),
                   _rotation(u(-8, 8), u(-8, 8), 38.0 + u(-8, 8)))
    for side, sign, z0 in (("kidney_right", -1.0, -27.0), ("kidney_left", 1.0, -12.0)):
        center = pos((sign * 75.0, 40.0, z0), sx, sy, 7.0)
        axes = size((31.0, 23.0, 56.0), 0.09, 0.05)
        # Upper pole tilted medially and posteriorly; hilum turned antero-medially.
        rot = _rotation(-12.0 + u(-6, 6), -sign * (12.0 + u(-5, 5)), sign * (30.0 + u(-8, 8)))
        a[side] = (center, axes, rot, u(5.5, 8.0))
    fundus_c = pos((72.0, -5.0, 85.0), sx, sy, 6.0)
    a["stomach"] = (fundus_c, size((34.0, 34.0, 32.0), 0.1, 0.06),
                    pos((40.0, -48.0, 50.0), sx, sy, 6.0), size((46.0, 27.0, 42.0), 0.1, 0.06),
                    _rotation(u(-6, 6), 35.0 + u(-8, 8), -25.0 + u(-8, 8)),
                    u(4.0, 6.0), u(0.1, 0.4))  # wall thickness (mm), fraction of lumen height that is gas
    panc = np.array([[-40.0, -4.0, 6.0], [-14.0, -16.0, 11.0], [14.0, -14.0, 15.0], [52.0, 2.0, 21.0], [80.0, 16.0, 28.0]])
    panc[:, 0] *= sx
    panc[:, 1] = (panc[:, 1] - 20.0) * sy + 20.0 + (ay0 - 20.0)  # keep it anterior to the aorta
    panc += u(-5.0, 5.0, (5, 3))
    panc += u(-6.0, 6.0, 3)
    a["pancreas"] = (panc, np.array([15.0, 11.0, 10.5, 9.0, 7.0]) * u(0.88, 1.12))

    a["hu_jitter"] = u(-6.0, 6.0, _N_TISSUES)
    a["boost_factor"] = u(0.85, 1.15)
    a["inhomogeneity"] = _random_modes(rng, 3, (60.0, 160.0), u(4.0, 8.0), 1)
    a["fov_shift"] = np.array([u(-5, 5), u(-5, 5), 8.0 + u(-15, 15)])  # scan range varies +-15 mm
    return a


def _grid_geometry(scanner: ScannerProfile, size_limit: int, center: np.ndarray):
    fov = np.asarray(FIELD_OF_VIEW_MM)
    spacing = np.asarray(scanner.spacing_mm, dtype=float)
    size = np.rint(fov / spacing).astype(int)
    over = size > size_limit
    spacing = np.where(over, fov / size_limit, spacing)
    size = np.clip(size, 1, size_limit)
    direction = np.asarray(scanner.direction, dtype=float).reshape(3, 3)
    origin = center - direction @ ((size - 1) / 2.0 * spacing)
    return size, spacing, origin, direction


def _paint_tissues(q: np.ndarray, a: dict) -> np.ndarray:
    """Tissue class of every point (flat, uint8); organs later in label order overwrite earlier ones."""
    n = q.shape[1]
    x, y, z = q[0], q[1], q[2]
    tissue = np.full(n, _T_AIR, dtype=np.uint8)

    # Body wall: skin/subcutaneous fat, muscle, then the visceral cavity.
    ba, bb = a["body_axes"]
    p = a["body_power"]
    ax_, ay_ = np.abs(x), np.abs(y)

    def inside(da: float, db: float) -> np.ndarray:
        return (ax_ / (ba - da)) ** p + (ay_ / (bb - db)) ** p <= 1.0

    fat_mm, mus_mm = a["fat_mm"], a["muscle_mm"]
    tissue[inside(0.0, 0.0)] = _T_FAT
    tissue[inside(fat_mm * 1.25, fat_mm * 0.9)] = _T_MUSCLE
    cavity = inside(fat_mm * 1.25 + mus_mm, fat_mm * 0.9 + mus_mm)
    tissue[cavity] = _T_VISCERA

    # Ribs: bony bands inside the muscle wall, sloping down anteriorly, absent low in the abdomen.
    theta = np.arctan2(y / bb, x / ba)
    rib_z = z - 28.0 * np.sin(theta) - a["rib_phase"]
    rib_band = np.mod(rib_z, 36.0) < 11.0
    rib_level = (z - 28.0 * np.sin(theta)) > -35.0
    lateral = (np.abs(np.sin(theta)) < 0.9) | ((np.sin(theta) < 0) & (z > 60.0))
    rib_shell = inside(fat_mm * 1.25 + 1.0, fat_mm * 0.9 + 1.0) & ~inside(fat_mm * 1.25 + mus_mm - 1.0, fat_mm * 0.9 + mus_mm - 1.0)
    rib = rib_band & rib_level & lateral & rib_shell
    tissue[rib] = _T_CANCELLOUS
    tissue[rib & ~inside(fat_mm * 1.25 + 3.0, fat_mm * 0.9 + 3.0)] = _T_CORTICAL

    # Paraspinal and psoas muscles.
    vbx, vby = a["vb_center"]
    vba, vbb = a["vb_axes"]
    for sign in (-1.0, 1.0):
        para = ((x - (vbx + sign * 36.0)) / 30.0) ** 2 + ((y - (vby + 42.0)) / 24.0) ** 2 <= 1.0
        tissue[para & (tissue != _T_AIR) & (tissue != _T_FAT)] = _T_MUSCLE
        psoas_r = 9.0 + np.clip(-z, 0.0, None) * 0.12
        psoas = ((x - (vbx + sign * (vba + 0.8 * psoas_r))) ** 2 + (y - (vby - 4.0)) ** 2) <= psoas_r ** 2
        tissue[psoas & cavity] = _T_MUSCLE
    cavity &= tissue == _T_VISCERA  # what is left for the organs

    # Veins and non-labelled arteries first, so the organs paint over them.
    (ivx, ivy), (iva, ivb) = a["ivc"]
    ivc = cavity & (((x - ivx) / iva) ** 2 + ((y - ivy) / ivb) ** 2 <= 1.0)
    tissue[ivc] = _T_VEIN
    cavity &= ~ivc  # the intrahepatic IVC stays out of the liver label, as in clinical annotations

    # Organs, in label order.
    c, ax3, rot, pw = a["liver_right"]
    liver = _ellipsoid(q, c, ax3, rot, pw)
    c, ax3, rot = a["liver_left"]
    liver |= _ellipsoid(q, c, ax3, rot)
    tissue[liver & cavity] = _T_LIVER

    c, ax3, rot = a["spleen"]
    tissue[_ellipsoid(q, c, ax3, rot) & cavity] = _T_SPLEEN

    for side, t_cortex, t_medulla, sign in (("kidney_right", _T_KID_R_CORTEX, _T_KID_R_MEDULLA, -1.0),
                                            ("kidney_left", _T_KID_L_CORTEX, _T_KID_L_MEDULLA, 1.0)):
        c, ax3, rot, cortex = a[side]
        outer = _ellipsoid(q, c, ax3, rot)
        # Hilum: a notch on the medial side (local -x points medially for both kidneys after the mirror).
        hilum_c = c + rot @ np.array([-sign * ax3[0] * 0.95, -ax3[1] * 0.15, 0.0])
        hilum = _ellipsoid(q, hilum_c, (ax3[0] * 0.45, ax3[1] * 0.5, ax3[2] * 0.38), rot)
        kidney = outer & ~hilum & cavity
        inner = _ellipsoid(q, c, np.maximum(ax3 - cortex, 2.0), rot)
        tissue[kidney] = t_cortex
        tissue[kidney & inner] = t_medulla

    fc, fax, bc, bax, brot, wall, gas_frac = a["stomach"]
    outer = _ellipsoid(q, fc, fax) | _ellipsoid(q, bc, bax, brot)
    lumen = _ellipsoid(q, fc, np.maximum(fax - wall, 2.0)) | _ellipsoid(q, bc, np.maximum(bax - wall, 2.0), brot)
    outer &= cavity
    lumen &= outer
    tissue[outer] = _T_STOMACH_WALL
    tissue[lumen] = _T_STOMACH_FLUID
    if lumen.any():  # gas floats anteriorly (-y) in a supine patient
        ly = y[lumen]
        level = ly.min() + gas_frac * (ly.max() - ly.min())
        tissue[lumen & (y < level)] = _T_STOMACH_GAS

    ctrl, radii = a["pancreas"]
    curve = _catmull_rom(np.column_stack([ctrl, radii]), 5)
    tissue[_tube(q, curve[:, :3], curve[:, 3]) & cavity] = _T_PANCREAS

    line, rad = a["aorta_line"], a["aorta_radius"]
    zb = a["aorta_bifurcation_z"]
    keep = line[:, 2] >= zb - 40.0
    aorta_all = _tube(q, line[keep], rad[keep])
    aorta = aorta_all & (z >= zb)
    tissue[aorta & cavity] = _T_AORTA
    # Common iliac arteries below the bifurcation (enhancing, not labelled).
    bif = np.array([np.interp(zb, line[:, 2], line[:, 0]), np.interp(zb, line[:, 2], line[:, 1]), zb])
    r_il = float(np.interp(zb, line[:, 2], rad)) * 0.7
    for sign in (-1.0, 1.0):
        end = bif + np.array([sign * 60.0, 8.0, -150.0])
        tissue[_tube(q, np.stack([bif, end]), np.array([r_il, r_il])) & cavity & (z < zb)] = _T_ARTERY

    # Spine last: vertebral bodies with discs, cortical shell, canal and posterior elements.
    vb = ((x - vbx) / vba) ** 2 + ((y - vby) / vbb) ** 2 <= 1.0
    vb_core = ((x - vbx) / (vba - 2.5)) ** 2 + ((y - vby) / (vbb - 2.5)) ** 2 <= 1.0
    level = np.mod(z - a["vertebra_phase"], a["vertebra_period"])
    disc = level < 7.0
    endplate = (level < 9.0) | (level > a["vertebra_period"] - 2.0)
    tissue[vb] = _T_CORTICAL
    tissue[vb_core & ~endplate] = _T_CANCELLOUS
    tissue[vb & disc] = _T_DISC
    canal_y = vby + vbb + 10.0
    dcan = np.sqrt((x - vbx) ** 2 + (y - canal_y) ** 2)
    posterior = (dcan <= 16.0) & (y > vby + vbb - 2.0)
    spinous = (np.abs(x - vbx) <= 5.0) & (y > canal_y) & (y < canal_y + 34.0) & (level > 9.0)
    bone_post = (posterior | spinous) & (tissue != _T_AIR) & (tissue != _T_FAT)
    tissue[bone_post] = _T_CORTICAL
    tissue[bone_post & (dcan > 11.5) & (dcan < 14.0) & ~spinous] = _T_CANCELLOUS
    tissue[(dcan <= 9.0)] = _T_CSF
    return tissue


def make_subject(rng: np.random.Generator, scanner: ScannerProfile,
                 size_limit: int = 96) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic subject: ``(CT image in HU as int16, label map as uint8)`` on the same grid.

    The grid covers :data:`FIELD_OF_VIEW_MM` at ``scanner.spacing_mm`` (spacing is increased on an
    axis whose size would exceed ``size_limit``) with ``scanner.direction``; the field of view is
    shifted by up to +-15 mm craniocaudally (+-5 mm in-plane) around the body centre at world (0, 0, 0).
    """
    if size_limit < 8:
        raise ValueError(f"size_limit must be at least 8 voxels, got {size_limit}")
    a = _sample_anatomy(rng)
    size, spacing, origin, direction = _grid_geometry(scanner, size_limit, a["fov_shift"])
    nx, ny, nz = (int(s) for s in size)
    shape = (nz, ny, nx)

    # World coordinates of every voxel centre (flat, array order z, y, x).
    kk, jj, ii = np.indices(shape, dtype=np.float32).reshape(3, -1)
    index_mm = np.stack([ii, jj, kk]) * spacing[:, None].astype(np.float32)
    world = (direction.astype(np.float32) @ index_mm) + origin[:, None].astype(np.float32)
    del kk, jj, ii, index_mm

    # Anatomy coordinates: undo the subject's rigid pose, then the smooth non-rigid deformation.
    rot = a["body_rot"].astype(np.float32)
    q = rot.T @ (world - a["body_shift"][:, None].astype(np.float32))
    q += _eval_modes(q, a["deform"])

    tissue = _paint_tissues(q, a)
    label = _TISSUE_LABEL[tissue]

    # Appearance: tissue HU (+ contrast), visceral fat/bowel texture, inhomogeneity, blur, noise, scanner.
    boost = scanner.contrast_boost_hu * a["boost_factor"]
    table = _NATIVE_HU + _ENHANCE * np.float32(boost)
    table[_SOFT_TISSUES] += a["hu_jitter"][_SOFT_TISSUES].astype(np.float32)
    hu = table[tissue]
    soft = np.isin(tissue, _SOFT_TISSUES)
    hu[soft] += _eval_modes(q[:, soft], a["inhomogeneity"])[0]

    hu = hu.reshape(shape)
    tissue = tissue.reshape(shape)
    sigma_vox = 6.0 / spacing[::-1]
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    field /= max(float(field.std()), 1e-6)
    viscera = tissue == _T_VISCERA
    bowel = np.where(field > 0.35, np.float32(28.0 + 0.3 * boost), np.float32(-95.0)) + 6.0 * field
    hu[viscera] = bowel[viscera]
    del field, bowel

    hu = ndimage.gaussian_filter(hu, 0.6, mode="nearest")  # partial-volume blur at boundaries
    if scanner.noise_hu > 0:
        noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5, mode="wrap")
        noise *= np.float32(scanner.noise_hu / max(float(noise.std()), 1e-6))
        hu += noise
    hu = hu * np.float32(scanner.hu_scale) + np.float32(scanner.hu_offset)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    image = sitk.GetImageFromArray(hu)
    seg = sitk.GetImageFromArray(label.reshape(shape))
    for im in (image, seg):
        im.SetSpacing(tuple(float(s) for s in spacing))
        im.SetOrigin(tuple(float(o) for o in origin))
        im.SetDirection(tuple(float(d) for d in direction.ravel()))
    return image, seg


# --------------------------------------------------------------------------------------------------
# Whole phantom
# --------------------------------------------------------------------------------------------------
def make_phantom(out: Path, sites: int = 3, labeled: int = 3, unlabeled: int = 6, test: int = 3, seed: int = 0,
                 partial_sites: int = 1) -> list[Path]:
    """Write ``sites`` site folders ``out/site_A``, ``out/site_B``, ... and return their paths.

    Per site: ``labeled`` annotated training scans, then ``unlabeled`` training scans without labels,
    then ``test`` held-out scans with full reference labels. The last ``partial_sites`` sites are
    partially annotated: their labeled scans show only :data:`PARTIAL_ANNOTATED` (other organs are 0).
    Re-running into the same folder overwrites it (stale case files of the same site are removed);
    ``cases.json`` is written last, so its presence marks a complete site.
    """
    out = Path(out)
    for name, value in (("sites", sites), ("labeled", labeled), ("unlabeled", unlabeled), ("test", test),
                        ("partial_sites", partial_sites)):
        if int(value) != value or value < 0:
            raise ValueError(f"make_phantom: {name} must be a non-negative integer, got {value!r}")
    if not 1 <= sites <= 26:
        raise ValueError(f"make_phantom: sites must be between 1 and 26, got {sites}")
    if partial_sites > sites:
        raise ValueError(f"make_phantom: partial_sites ({partial_sites}) cannot exceed sites ({sites})")

    all_organs = list(_ORGANS)
    partial_drop = [PHANTOM_LABELS[o] for o in _ORGANS if o not in PARTIAL_ANNOTATED]
    paths = []
    for s in range(sites):
        letter = site_letter(s)
        scanner = scanner_for_site(s)
        partial = s >= sites - partial_sites
        site_dir = out / f"site_{letter}"
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (site_dir / sub).mkdir(parents=True, exist_ok=True)
        cases: dict[str, dict] = {}
        written: set[Path] = set()
        for c in range(labeled + unlabeled + test):
            case_id = f"ph{letter}_{c:03d}"
            split = "labeled" if c < labeled else "unlabeled" if c < labeled + unlabeled else "test"
            rng = np.random.default_rng([int(seed), s, c])
            image, seg = make_subject(rng, scanner)
            if split == "test":
                written.add(write_image(image, site_dir / "imagesTs" / f"{case_id}_0000.nii.gz"))
                written.add(write_image(seg, site_dir / "labelsTs" / f"{case_id}.nii.gz"))
                annotated = all_organs
            else:
                written.add(write_image(image, site_dir / "imagesTr" / f"{case_id}_0000.nii.gz"))
                annotated = []
                if split == "labeled":
                    annotated = all_organs
                    if partial:
                        arr = sitk.GetArrayFromImage(seg)
                        arr[np.isin(arr, partial_drop)] = 0
                        drawn = sitk.GetImageFromArray(arr)
                        drawn.CopyInformation(seg)
                        seg = drawn
                        annotated = list(PARTIAL_ANNOTATED)
                    written.add(write_image(seg, site_dir / "labelsTr" / f"{case_id}.nii.gz"))
            cases[case_id] = {"site": letter, "split": split, "annotated": annotated}
        pattern = re.compile(rf"^ph{letter}_\d+(_0000)?\.nii\.gz$")
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            for f in (site_dir / sub).iterdir():
                if f.is_file() and pattern.match(f.name) and f not in written:
                    f.unlink()
        write_json({
            "name": f"FADAL phantom site {letter}",
            "channel_names": {"0": "CT"},
            "labels": dict(PHANTOM_LABELS),
            "numTraining": labeled + unlabeled,
            "file_ending": ".nii.gz",
            "scanner": scanner.to_dict(),
            "description": (
                f"Synthetic abdominal CT phantom, site {letter} ({scanner.name}). "
                f"{labeled} labeled + {unlabeled} unlabeled training scans, {test} test scans; "
                + ("labeled scans annotate only " + ", ".join(PARTIAL_ANNOTATED) + ". " if partial else "")
                + f"Generated by fadal.data.phantom with seed {seed}."
            ),
        }, site_dir / "dataset.json")
        write_json(cases, site_dir / "cases.json")
        paths.append(site_dir)
    return paths
