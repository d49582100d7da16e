"""The phantom's tissues: their classes, native HU, share of the contrast boost and label, and how one subject's
anatomy (:func:`fadal.data.phantom_anatomy.sample_anatomy`) is painted into a tissue class per point.

Painting goes from the outside in: body wall and ribs, back muscles, veins, then the organs in label order
(a later organ overwrites an earlier one), and the spine last.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Callable

import numpy as np

from fadal.data.phantom_shapes import catmull_rom, ellipsoid, tube


class Tissue(IntEnum):
    """The painted classes (values index the tables below)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    VISCERA = 3
    CORTICAL = 4
    CANCELLOUS = 5
    DISC = 6
    CSF = 7
    VEIN = 8
    ARTERY = 9
    LIVER = 10
    SPLEEN = 11
    KID_R_CORTEX = 12
    KID_R_MEDULLA = 13
    KID_L_CORTEX = 14
    KID_L_MEDULLA = 15
    STOMACH_WALL = 16
    STOMACH_FLUID = 17
    STOMACH_GAS = 18
    PANCREAS = 19
    AORTA = 20


N_TISSUES = len(Tissue)

#: tissue -> (native HU, share of the scanner's contrast boost, label value)
_PROPERTIES: dict[Tissue, tuple[float, float, int]] = {
    Tissue.AIR: (-1000, 0.0, 0), Tissue.FAT: (-100, 0.0, 0), Tissue.MUSCLE: (50, 0.08, 0),
    Tissue.VISCERA: (-90, 0.0, 0), Tissue.CORTICAL: (800, 0.0, 0), Tissue.CANCELLOUS: (360, 0.05, 0),
    Tissue.DISC: (90, 0.05, 0), Tissue.CSF: (12, 0.0, 0), Tissue.VEIN: (40, 0.18, 0), Tissue.ARTERY: (40, 1.25, 0),
    Tissue.LIVER: (60, 0.22, 1), Tissue.SPLEEN: (50, 0.55, 2),
    Tissue.KID_R_CORTEX: (35, 1.0, 3), Tissue.KID_R_MEDULLA: (30, 0.35, 3),
    Tissue.KID_L_CORTEX: (35, 1.0, 4), Tissue.KID_L_MEDULLA: (30, 0.35, 4),
    Tissue.STOMACH_WALL: (40, 0.3, 5), Tissue.STOMACH_FLUID: (10, 0.0, 5), Tissue.STOMACH_GAS: (-990, 0.0, 5),
    Tissue.PANCREAS: (40, 0.5, 6), Tissue.AORTA: (40, 1.25, 7),
}
NATIVE_HU = np.array([_PROPERTIES[t][0] for t in Tissue], dtype=np.float32)
ENHANCE = np.array([_PROPERTIES[t][1] for t in Tissue], dtype=np.float32)
TISSUE_LABEL = np.array([_PROPERTIES[t][2] for t in Tissue], dtype=np.uint8)
#: Tissues that get the subject's per-organ HU jitter and the low-frequency inhomogeneity.
SOFT_TISSUES = np.array([Tissue.MUSCLE, Tissue.LIVER, Tissue.SPLEEN, Tissue.KID_R_CORTEX, Tissue.KID_R_MEDULLA,
                         Tissue.KID_L_CORTEX, Tissue.KID_L_MEDULLA, Tissue.STOMACH_WALL, Tissue.PANCREAS,
                         Tissue.AORTA, Tissue.VEIN, Tissue.ARTERY])


def paint_tissues(q: np.ndarray, a: dict) -> np.ndarray:
    """Tissue class of every point (flat, uint8); organs later in label order overwrite earlier ones."""
    tissue = np.full(q.shape[1], Tissue.AIR, dtype=np.uint8)
    inside = _body_inset(q, a)
    cavity = _paint_body_wall(tissue, q, a, inside)
    cavity = _paint_back_muscles(tissue, q, a, cavity)
    cavity = _paint_vena_cava(tissue, q, a, cavity)
    for paint in (_paint_liver, _paint_spleen, _paint_kidneys, _paint_stomach, _paint_pancreas, _paint_aorta):
        paint(tissue, q, a, cavity)
    _paint_spine(tissue, q, a)
    return tissue


def _body_inset(q: np.ndarray, a: dict) -> Callable[[float, float], np.ndarray]:
    """``inside(da, db)``: the body's superelliptic cross-section shrunk by da mm (left-right), db mm (front-back)."""
    ba, bb = a["body_axes"]
    p = a["body_power"]
    ax_, ay_ = np.abs(q[0]), np.abs(q[1])

    def inside(da: float, db: float) -> np.ndarray:
        return (ax_ / (ba - da)) ** p + (ay_ / (bb - db)) ** p <= 1.0

    return inside


def _paint_body_wall(tissue: np.ndarray, q: np.ndarray, a: dict,
                     inside: Callable[[float, float], np.ndarray]) -> np.ndarray:
    """Skin/subcutaneous fat, muscle, the visceral cavity and the ribs; returns the cavity."""
    x, y, z = q[0], q[1], q[2]
    ba, bb = a["body_axes"]
    fat_mm, mus_mm = a["fat_mm"], a["muscle_mm"]
    tissue[inside(0.0, 0.0)] = Tissue.FAT
    tissue[inside(fat_mm * 1.25, fat_mm * 0.9)] = Tissue.MUSCLE
    cavity = inside(fat_mm * 1.25 + mus_mm, fat_mm * 0.9 + mus_mm)
    tissue[cavity] = Tissue.VISCERA

    # Ribs: bony bands inside the muscle wall, sloping down anteriorly, absent low in the abdomen.
    theta = np.arctan2(y / bb, x / ba)
    rib_z = z - 28.0 * np.sin(theta) - a["rib_phase"]
    rib_band = np.mod(rib_z, 36.0) < 11.0
    rib_level = (z - 28.0 * np.sin(theta)) > -35.0
    lateral = (np.abs(np.sin(theta)) < 0.9) | ((np.sin(theta) < 0) & (z > 60.0))
    rib_shell = inside(fat_mm * 1.25 + 1.0, fat_mm * 0.9 + 1.0) & ~inside(fat_mm * 1.25 + mus_mm - 1.0, fat_mm * 0.9 + mus_mm - 1.0)
    rib = rib_band & rib_level & lateral & rib_shell
    tissue[rib] = Tissue.CANCELLOUS
    tissue[rib & ~inside(fat_mm * 1.25 + 3.0, fat_mm * 0.9 + 3.0)] = Tissue.CORTICAL
    return cavity


def _paint_back_muscles(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> np.ndarray:
    """Paraspinal and psoas muscles; returns what is left of the cavity for the organs."""
    x, y, z = q[0], q[1], q[2]
    vbx, vby = a["vb_center"]
    vba, vbb = a["vb_axes"]
    for sign in (-1.0, 1.0):
        para = ((x - (vbx + sign * 36.0)) / 30.0) ** 2 + ((y - (vby + 42.0)) / 24.0) ** 2 <= 1.0
        tissue[para & (tissue != Tissue.AIR) & (tissue != Tissue.FAT)] = Tissue.MUSCLE
        psoas_r = 9.0 + np.clip(-z, 0.0, None) * 0.12
        psoas = ((x - (vbx + sign * (vba + 0.8 * psoas_r))) ** 2 + (y - (vby - 4.0)) ** 2) <= psoas_r ** 2
        tissue[psoas & cavity] = Tissue.MUSCLE
    return cavity & (tissue == Tissue.VISCERA)


def _paint_vena_cava(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> np.ndarray:
    """The IVC before the organs, so they paint over it; returns the cavity without it."""
    x, y = q[0], q[1]
    (ivx, ivy), (iva, ivb) = a["ivc"]
    ivc = cavity & (((x - ivx) / iva) ** 2 + ((y - ivy) / ivb) ** 2 <= 1.0)
    tissue[ivc] = Tissue.VEIN
    return cavity & ~ivc  # the intrahepatic IVC stays out of the liver label, as in clinical annotations


def _paint_liver(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> None:
    c, ax3, rot, pw = a["liver_right"]
    liver = ellipsoid(q, c, ax3, rot, pw)
    c, ax3, rot = a["liver_left"]
    liver |= ellipsoid(q, c, ax3, rot)
    tissue[liver & cavity] = Tissue.LIVER


def _paint_spleen(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> None:
    c, ax3, rot = a["spleen"]
    tissue[ellipsoid(q, c, ax3, rot) & cavity] = Tissue.SPLEEN


def _paint_kidneys(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> None:
    """Cortex and medulla, with a hilum notch on the medial side."""
    for side, t_cortex, t_medulla, sign in (("kidney_right", Tissue.KID_R_CORTEX, Tissue.KID_R_MEDULLA, -1.0),
                                            ("kidney_left", Tissue.KID_L_CORTEX, Tissue.KID_L_MEDULLA, 1.0)):
        c, ax3, rot, cortex = a[side]
        outer = ellipsoid(q, c, ax3, rot)
        # Hilum: a notch on the medial side (local -x points medially for both kidneys after the mirror).
        hilum_c = c + rot @ np.array([-sign * ax3[0] * 0.95, -ax3[1] * 0.15, 0.0])
        hilum = ellipsoid(q, hilum_c, (ax3[0] * 0.45, ax3[1] * 0.5, ax3[2] * 0.38), rot)
        kidney = outer & ~hilum & cavity
        inner = ellipsoid(q, c, np.maximum(ax3 - cortex, 2.0), rot)
        tissue[kidney] = t_cortex
        tissue[kidney & inner] = t_medulla


def _paint_stomach(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> None:
    """Fundus and body: wall, fluid, and gas floating anteriorly (-y) in a supine patient."""
    y = q[1]
    fc, fax, bc, bax, brot, wall, gas_frac = a["stomach"]
    outer = ellipsoid(q, fc, fax) | ellipsoid(q, bc, bax, brot)
    lumen = ellipsoid(q, fc, np.maximum(fax - wall, 2.0)) | ellipsoid(q, bc, np.maximum(bax - wall, 2.0), brot)
    outer &= cavity
    lumen &= outer
    tissue[outer] = Tissue.STOMACH_WALL
    tissue[lumen] = Tissue.STOMACH_FLUID
    if lumen.any():
        ly = y[lumen]
        level = ly.min() + gas_frac * (ly.max() - ly.min())
        tissue[lumen & (y < level)] = Tissue.STOMACH_GAS


def _paint_pancreas(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> None:
    ctrl, radii = a["pancreas"]
    curve = catmull_rom(np.column_stack([ctrl, radii]), 5)
    tissue[tube(q, curve[:, :3], curve[:, 3]) & cavity] = Tissue.PANCREAS


def _paint_aorta(tissue: np.ndarray, q: np.ndarray, a: dict, cavity: np.ndarray) -> None:
    """The aorta (labelled) down to its bifurcation, then the common iliac arteries (enhancing, not labelled)."""
    z = q[2]
    line, rad = a["aorta_line"], a["aorta_radius"]
    zb = a["aorta_bifurcation_z"]
    keep = line[:, 2] >= zb - 40.0
    aorta_all = tube(q, line[keep], rad[keep])
    aorta = aorta_all & (z >= zb)
    tissue[aorta & cavity] = Tissue.AORTA
    bif = np.array([np.interp(zb, line[:, 2], line[:, 0]), np.interp(zb, line[:, 2], line[:, 1]), zb])
    r_il = float(np.interp(zb, line[:, 2], rad)) * 0.7
    for sign in (-1.0, 1.0):
        end = bif + np.array([sign * 60.0, 8.0, -150.0])
        tissue[tube(q, np.stack([bif, end]), np.array([r_il, r_il])) & cavity & (z < zb)] = Tissue.ARTERY


def _paint_spine(tissue: np.ndarray, q: np.ndarray, a: dict) -> None:
    """Vertebral bodies with discs, cortical shell, canal and posterior elements (painted last)."""
    x, y, z = q[0], q[1], q[2]
    vbx, vby = a["vb_center"]
    vba, vbb = a["vb_axes"]
    vb = ((x - vbx) / vba) ** 2 + ((y - vby) / vbb) ** 2 <= 1.0
    vb_core = ((x - vbx) / (vba - 2.5)) ** 2 + ((y - vby) / (vbb - 2.5)) ** 2 <= 1.0
    level = np.mod(z - a["vertebra_phase"], a["vertebra_period"])
    disc = level < 7.0
    endplate = (level < 9.0) | (level > a["vertebra_period"] - 2.0)
    tissue[vb] = Tissue.CORTICAL
    tissue[vb_core & ~endplate] = Tissue.CANCELLOUS
    tissue[vb & disc] = Tissue.DISC
    canal_y = vby + vbb + 10.0
    dcan = np.sqrt((x - vbx) ** 2 + (y - canal_y) ** 2)
    posterior = (dcan <= 16.0) & (y > vby + vbb - 2.0)
    spinous = (np.abs(x - vbx) <= 5.0) & (y > canal_y) & (y < canal_y + 34.0) & (level > 9.0)
    bone_post = (posterior | spinous) & (tissue != Tissue.AIR) & (tissue != Tissue.FAT)
    tissue[bone_post] = Tissue.CORTICAL
    tissue[bone_post & (dcan > 11.5) & (dcan < 14.0) & ~spinous] = Tissue.CANCELLOUS
    tissue[(dcan <= 9.0)] = Tissue.CSF
