"""One phantom subject's anatomy as random parameters: body and organ sizes, positions, rotations, the smooth
non-rigid deformation and the appearance jitter, drawn in a fixed order (a fixed number of draws per subject,
so one subject never depends on another). :mod:`fadal.data.phantom_tissues` paints them."""

from __future__ import annotations

import numpy as np

from fadal.data.phantom_shapes import random_modes, rotation
from fadal.data.phantom_tissues import N_TISSUES


def sample_anatomy(rng: np.random.Generator) -> dict:
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
    a["body_rot"] = rotation(u(-3, 3), u(-2, 2), u(-5, 5))
    a["body_shift"] = u(-4, 4, 3)
    a["deform"] = random_modes(rng, 4, (200.0, 360.0), u(5.0, 8.0), 3)

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
                        rotation(u(-6, 6), u(-6, 6), u(-8, 8)), u(2.3, 2.8))
    a["liver_left"] = (pos((10.0, -42.0, 62.0), sx, sy, 8.0), size((58.0, 28.0, 34.0), 0.1, 0.06),
                       rotation(u(-5, 5), u(-8, 8), u(-10, 10)))
    a["spleen"] = (pos((88.0, 44.0, 65.0), sx, sy, 7.0), size((24.0, 52.0, 46.0), 0.1, 0.05),
                   rotation(u(-8, 8), u(-8, 8), 38.0 + u(-8, 8)))
    for side, sign, z0 in (("kidney_right", -1.0, -27.0), ("kidney_left", 1.0, -12.0)):
        center = pos((sign * 75.0, 40.0, z0), sx, sy, 7.0)
        axes = size((31.0, 23.0, 56.0), 0.09, 0.05)
        # Upper pole tilted medially and posteriorly; hilum turned antero-medially.
        rot = rotation(-12.0 + u(-6, 6), -sign * (12.0 + u(-5, 5)), sign * (30.0 + u(-8, 8)))
        a[side] = (center, axes, rot, u(5.5, 8.0))
    fundus_c = pos((72.0, -5.0, 85.0), sx, sy, 6.0)
    a["stomach"] = (fundus_c, size((34.0, 34.0, 32.0), 0.1, 0.06),
                    pos((40.0, -48.0, 50.0), sx, sy, 6.0), size((46.0, 27.0, 42.0), 0.1, 0.06),
                    rotation(u(-6, 6), 35.0 + u(-8, 8), -25.0 + u(-8, 8)),
                    u(4.0, 6.0), u(0.1, 0.4))  # wall thickness (mm), fraction of lumen height that is gas
    panc = np.array([[-40.0, -4.0, 6.0], [-14.0, -16.0, 11.0], [14.0, -14.0, 15.0], [52.0, 2.0, 21.0], [80.0, 16.0, 28.0]])
    panc[:, 0] *= sx
    panc[:, 1] = (panc[:, 1] - 20.0) * sy + 20.0 + (ay0 - 20.0)  # keep it anterior to the aorta
    panc += u(-5.0, 5.0, (5, 3))
    panc += u(-6.0, 6.0, 3)
    a["pancreas"] = (panc, np.array([15.0, 11.0, 10.5, 9.0, 7.0]) * u(0.88, 1.12))

    a["hu_jitter"] = u(-6.0, 6.0, N_TISSUES)
    a["boost_factor"] = u(0.85, 1.15)
    a["inhomogeneity"] = random_modes(rng, 3, (60.0, 160.0), u(4.0, 8.0), 1)
    a["fov_shift"] = np.array([u(-5, 5), u(-5, 5), 8.0 + u(-15, 15)])  # scan range varies +-15 mm
    return a
