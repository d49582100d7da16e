"""Synthetic CT phantoms for the amplification tests: known anatomy, known deformation, real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

#: Organs as (label, HU, centre mm, radii mm) ellipsoids inside a soft-tissue body in air.
ORGANS = [
    (1, 130.0, (-25.0, -5.0, 0.0), (38.0, 30.0, 42.0)),  # "liver"
    (2, 220.0, (35.0, 12.0, -8.0), (18.0, 22.0, 28.0)),  # "kidney"
    (3, 700.0, (0.0, 38.0, 0.0), (10.0, 10.0, 80.0)),  # "spine" (bone)
]
BODY = ((0.0, 0.0, 0.0), (80.0, 62.0, 90.0), 20.0)
#: Unlabelled structures as (HU, centre mm, radii mm): lungs on top and a bladder below make the
#: anatomy differ from its craniocaudal mirror image, as real anatomy does (the initialisation tests
#: search along z).
UNLABELLED = [
    (-850.0, (-35.0, 0.0, 62.0), (26.0, 30.0, 36.0)),
    (-850.0, (35.0, 0.0, 62.0), (26.0, 30.0, 36.0)),
    (5.0, (0.0, -15.0, -62.0), (22.0, 18.0, 16.0)),
]


def _anatomy(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU and label at world points (N, 3) in mm."""
    hu = np.full(points.shape[0], -1000.0, dtype=np.float32)
    lab = np.zeros(points.shape[0], dtype=np.uint8)
    centre, radii, body_hu = BODY
    inside = (((points - centre) / radii) ** 2).sum(1) <= 1.0
    hu[inside] = body_hu
    for struct_hu, c, r in UNLABELLED:
        hu[inside & ((((points - np.asarray(c)) / np.asarray(r)) ** 2).sum(1) <= 1.0)] = struct_hu
    for value, organ_hu, c, r in ORGANS:
        m = inside & ((((points - np.asarray(c)) / np.asarray(r)) ** 2).sum(1) <= 1.0)
        hu[m] = organ_hu
        lab[m] = value
    return hu, lab


def make_phantom(size: int = 48, spacing: float = 4.0, shift_mm=(0.0, 0.0, 0.0), warp_mm: float = 0.0,
                 flip: bool = False, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """CT (int16 HU) and label (uint8) of the phantom, sampled on a centred ``size``^3 grid.

    The anatomy seen at world point y is the reference anatomy at ``y - shift - u(y)`` with a smooth
    sinusoidal displacement ``u`` of amplitude ``warp_mm``; ``flip`` stores the volume with a
    different direction matrix (x and y axes reversed), covering the same world region.
    """
    rng = np.random.default_rng(seed)
    direction = np.diag([-1.0, -1.0, 1.0]) if flip else np.eye(3)
    extent = (size - 1) * spacing
    origin = direction @ np.full(3, -extent / 2.0)
    idx = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)[:, ::-1]  # (x,y,z) for z-major
    world = origin + (idx * spacing) @ direction.T
    u = warp_mm * np.stack([
        np.sin(world[:, 1] / 40.0), np.sin(world[:, 2] / 45.0 + 0.5), np.sin(world[:, 0] / 50.0 + 1.0)
    ], 1)
    hu, lab = _anatomy(world - np.asarray(shift_mm) - u)
    hu = hu + rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    shape = (size, size, size)
    img = sitk.GetImageFromArray(np.round(hu).astype(np.int16).reshape(shape))
    seg = sitk.GetImageFromArray(lab.reshape(shape))
    for im in (img, seg):
        im.SetSpacing((spacing,) * 3)
        im.SetOrigin(tuple(origin))
        im.SetDirection(tuple(direction.ravel()))
    return img, seg


def dice(a: np.ndarray, b: np.ndarray, labels=(1, 2, 3)) -> float:
    """Mean Dice over ``labels``."""
    scores = []
    for c in labels:
        x, y = a == c, b == c
        scores.append(2.0 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1))
    return float(np.mean(scores))


@pytest.fixture
def phantom_pair(tmp_path: Path):
    """Fixed scan (4 mm, 48^3) and an atlas with shifted, warped anatomy on another grid and direction."""
    fixed, fixed_lab = make_phantom(48, 4.0, seed=1)
    moving, moving_lab = make_phantom(44, 4.5, shift_mm=(6.0, -4.0, 3.0), warp_mm=4.0, flip=True, seed=2)
    paths = {}
    for name, im in {"fixed": fixed, "fixed_label": fixed_lab, "atlas": moving, "atlas_label": moving_lab}.items():
        paths[name] = tmp_path / "in" / f"{name}.nii.gz"
        paths[name].parent.mkdir(exist_ok=True)
        sitk.WriteImage(im, str(paths[name]))
    return paths


@pytest.fixture
def phantom():
    """The :func:`make_phantom` factory (fixtures avoid importing this conftest as a module)."""
    return make_phantom


@pytest.fixture
def dice_score():
    return dice


@pytest.fixture(scope="session")
def one_itk_thread():
    """Registrations in this process use one ITK thread: the test machine is small and shared."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)


def fast_registration(**kw):
    """Settings that register the 48^3 phantoms in ~1-2 s with Dice > 0.9 (defaults take ~15 s)."""
    from fadal.config import RegistrationConfig

    base = dict(resolutions=2, affine_iterations=100, bspline_iterations=100, spatial_samples=1024, workers=1)
    base.update(kw)
    return RegistrationConfig(**base)


@pytest.fixture
def fast_cfg():
    return fast_registration
