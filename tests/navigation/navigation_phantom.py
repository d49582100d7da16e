"""Synthetic label/CT pair with awkward geometry for the navigation tests (imported by their conftest)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TOTALSEG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "totalseg_example"

#: Label values of the synthetic phantom (names chosen so the render colours are the anatomical ones).
SYNTH_LABELS = {"background": 0, "liver": 1, "spleen": 2}
#: World LPS (mm): a sphere on the patient's right (-x), anterior (-y) and superior, an ellipsoid on the left.
SPHERE_CENTRE = np.array([-25.0, 5.0, -92.0])
SPHERE_RADIUS = 14.0
ELLIPSOID_CENTRE = np.array([30.0, 20.0, -110.0])
ELLIPSOID_RADII = np.array([10.0, 14.0, 20.0])
#: Index axes: i -> world -x, j -> world -z, k -> world +y (a flipped, permuted, coronal-like grid).
DIRECTION = np.array([[-1.0, 0.0, 0.0],
                      [0.0, 0.0, 1.0],
                      [0.0, -1.0, 0.0]])
SPACING = (0.9, 1.3, 2.0)
WORLD_BOX = (np.array([-50.0, -15.0, -135.0]), np.array([55.0, 42.0, -62.0]))


@dataclass
class Synthetic:
    image: sitk.Image
    label: sitk.Image
    world: np.ndarray  # (z, y, x, 3) world LPS coordinates of the voxel centres


def make_synthetic() -> Synthetic:
    lo, hi = WORLD_BOX
    extent_along_index = np.abs(DIRECTION.T @ (hi - lo))
    size = [int(np.ceil(e / s)) + 1 for e, s in zip(extent_along_index, SPACING)]
    # Origin = the box corner that index (0, 0, 0) must sit on: the low end along every index axis.
    origin = np.where(DIRECTION @ np.ones(3) < 0, hi, lo)
    matrix = DIRECTION @ np.diag(SPACING)
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    world = np.stack([i, j, k], axis=-1) @ matrix.T + origin  # (z, y, x, 3)
    sphere = np.linalg.norm(world - SPHERE_CENTRE, axis=-1) <= SPHERE_RADIUS
    ellipsoid = ((((world - ELLIPSOID_CENTRE) / ELLIPSOID_RADII) ** 2).sum(-1)) <= 1.0
    label = np.zeros(world.shape[:3], np.uint8)
    label[sphere] = 1
    label[ellipsoid] = 2
    rng = np.random.default_rng(0)
    body = ((world[..., 0] - 2.5) / 50) ** 2 + ((world[..., 1] - 13) / 27) ** 2 <= 1
    ct = np.where(body, 30.0, -1000.0) + rng.normal(0, 8, world.shape[:3])
    ct[sphere] = 110 + rng.normal(0, 8, int(sphere.sum()))
    ct[ellipsoid] = 150 + rng.normal(0, 8, int(ellipsoid.sum()))
    images = []
    for arr in (ct.astype(np.int16), label):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(SPACING)
        im.SetOrigin(tuple(float(v) for v in origin))
        im.SetDirection(tuple(DIRECTION.ravel()))
        images.append(im)
    return Synthetic(images[0], images[1], world)
