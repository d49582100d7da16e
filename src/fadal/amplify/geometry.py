"""Geometry and image plumbing every registration method shares: body masks, world coordinates, NCC, Dice.

Arrays are in SimpleITK's (z, y, x) order on a ``sitk.Image``'s grid. Synthesis works on MONAI's
(X, Y, Z) arrays with a voxel -> world affine instead: :func:`image_from_affine` (and
:func:`affine_of` the other way) is the one adapter between the two, so the maths exists once.

Why each step (real CT is not a phantom):

* **Body masks** (:func:`body_mask_array`: HU > -500, opened, largest component, closed, holes
  filled per axial slice), grown by ``mask_margin_mm`` (:func:`grow`), are elastix's fixed and
  moving masks, so the table, the air and whatever lies outside the patient do not drive the
  metric. The margin keeps the skin inside both masks: with exact masks neither side sees the
  other's body bulge out of its own (measured on a phantom: body Dice 0.93 exact, 0.985 with 10 mm).
* **Scanned length**: scans cover different craniocaudal stretches of the body (and some datasets
  pad the rest with air). :func:`body_z_range` is the stretch a scan shows body in; :func:`in_slab`
  the voxels of another scan inside such a stretch (elsewhere fixed samples could only match air,
  and similarity measures are taken inside the common stretch only).
* **Intensities**: CT in HU is shifted to ``max(HU, -1024) + 1024`` (air = 0) before registration
  (:func:`shifted`). The shift changes none of the metrics (mutual information, correlation, and
  mean squares since both images are shifted alike), and it makes 0 (what fills the border of a
  resampled atlas) mean air; :data:`OUTSIDE` (-1) marks what lies outside an atlas's field of view.
* **NCC of an empty mask is NaN**, not the NCC of the whole volume: two scans that share no body
  have no similarity to measure, and a NaN fails every ``>=`` threshold (a failed registration).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fadal.data.io import read_image
from fadal.errors import FadalInputError

#: Voxels above this HU are "body".
BODY_HU = -500.0
AIR_HU = -1024.0
#: Pixel value written outside an atlas's field of view (shifted intensities are >= 0).
OUTSIDE = -1.0


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------

def read_3d(path: Path) -> sitk.Image:
    """A 3D single-channel volume, or a :class:`FadalInputError` naming the file."""
    img = read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise FadalInputError(
            f"{path}: expected a 3D single-channel volume, got dimension {img.GetDimension()} "
            f"with {img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return img


def shifted(img: sitk.Image) -> np.ndarray:
    """HU -> float32 with air = 0 (see the module docstring)."""
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    np.maximum(arr, AIR_HU, out=arr)
    arr -= AIR_HU
    return arr


def like(arr: np.ndarray, ref: sitk.Image, origin: Sequence[float] | None = None) -> sitk.Image:
    """A (z, y, x) array as an image on ``ref``'s grid (moved to ``origin`` if given)."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    return img


def to_itk(arr: np.ndarray, ref: sitk.Image, origin: Sequence[float] | None = None):
    """A (z, y, x) array as an ITK image (what elastix takes) on ``ref``'s grid, moved to ``origin`` if given."""
    import itk

    im = itk.image_from_array(np.ascontiguousarray(arr))
    im.SetSpacing([float(s) for s in ref.GetSpacing()])
    im.SetOrigin([float(o) for o in (ref.GetOrigin() if origin is None else origin)])
    im.SetDirection(itk.matrix_from_array(np.asarray(ref.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return im


def affine_of(img: sitk.Image) -> np.ndarray:
    """The (4, 4) voxel index (x, y, z) -> world matrix of an image: direction x spacing, then origin."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return a


def image_from_affine(arr_xyz: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """An (X, Y, Z) array on a voxel -> world ``affine`` (MONAI's layout) as a SimpleITK image. Whichever world convention the affine uses (MONAI's RAS), both images of a
    pair use it alike, and neither elastix nor these helpers care which it is."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr_xyz).transpose(2, 1, 0)))
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(np.asarray(affine, dtype=np.float64)[:3, 3].tolist())
    img.SetDirection((m / spacing).ravel().tolist())
    return img


# --------------------------------------------------------------------------------------------------
# world coordinates
# --------------------------------------------------------------------------------------------------

def to_world(index_xyz: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel indices (..., 3) in (x, y, z) order -> world points (..., 3)."""
    return index_xyz @ affine[:3, :3].T + affine[:3, 3]


def grid_world_points(shape_xyz: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (X, Y, Z, 3) of every voxel centre of an (X, Y, Z) grid on ``affine``."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape_xyz], indexing="ij"), -1)
    return to_world(idx, affine)


def world_points(mask: np.ndarray, img: sitk.Image, max_points: int = 200_000) -> np.ndarray:
    """World coordinates (N, 3) of the True voxels of a (z, y, x) array on ``img``'s grid (subsampled)."""
    idx = np.argwhere(mask)
    if len(idx) > max_points:
        idx = idx[:: len(idx) // max_points + 1]
    return to_world(idx[:, ::-1].astype(np.float64), affine_of(img))


def world_z(img: sitk.Image) -> np.ndarray:
    """World z (craniocaudal, mm) of every voxel, as a (z, y, x) float32 array."""
    a = affine_of(img)[2]
    nx, ny, nz = img.GetSize()
    z = a[3] + a[0] * np.arange(nx)[None, None, :] + a[1] * np.arange(ny)[None, :, None] \
        + a[2] * np.arange(nz)[:, None, None]
    return np.broadcast_to(z, (nz, ny, nx)).astype(np.float32)


def body_z_range(mask: np.ndarray, img: sitk.Image, bin_mm: float = 5.0, min_area: float = 0.1) -> tuple[float, float]:
    """Craniocaudal extent (world z, mm) of the scanned body: the 5 mm slabs holding at least 10 % of
    the largest slab's body voxels. The threshold ignores thin strays (a cable, the tip of a chin rest)
    that would otherwise stretch the extent."""
    z = world_points(mask, img)[:, 2]
    edges = np.arange(z.min(), z.max() + bin_mm, bin_mm)
    if len(edges) < 2:
        return float(z.min()), float(z.max())
    counts, edges = np.histogram(z, bins=edges)
    keep = np.flatnonzero(counts >= min_area * counts.max())
    return float(edges[keep[0]]), float(edges[keep[-1] + 1])


def in_slab(img: sitk.Image, z_range: tuple[float, float], tz: float = 0.0, margin: float = 0.0) -> np.ndarray:
    """Voxels (z, y, x) of ``img`` in the craniocaudal stretch ``z_range`` of another scan placed by ``tz``
    (its point z + tz sits at z), give or take ``margin`` mm."""
    fz = world_z(img)
    return (fz >= z_range[0] - tz - margin) & (fz <= z_range[1] - tz + margin)


# --------------------------------------------------------------------------------------------------
# masks and measures
# --------------------------------------------------------------------------------------------------

def axial_array_axis(img: sitk.Image) -> int:
    """Array axis (z, y, x order) that runs most nearly along world z (craniocaudal)."""
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(d[2])))


def body_mask_array(hu: np.ndarray, axial_axis: int = 0, threshold_hu: float = BODY_HU) -> np.ndarray:
    """The patient's body in a CT array (HU): thresholded, opened (detaches a thin table or cables),
    largest connected component, closed, and holes filled in each axial slice (lungs and bowel gas
    are inside the body, though below the threshold). Returns a bool array."""
    m = hu > threshold_hu
    if not m.any():
        return m
    # Erosions treat the volume's edge as body: a body cut by the field of view continues beyond it.
    m = ndimage.binary_dilation(ndimage.binary_erosion(m, border_value=1))
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    m = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    m = ndimage.binary_erosion(ndimage.binary_dilation(m, iterations=2), iterations=2, border_value=1)
    # Fill holes slice by slice: label the background with in-plane connectivity only (one pass;
    # ndimage.binary_fill_holes iterates a dilation to convergence, ~10x slower here), and keep as
    # background the components that touch a slice's edge.
    plane = np.zeros((3, 3, 3), dtype=bool)
    idx: list = [slice(None)] * 3
    idx[axial_axis] = 1
    plane[tuple(idx)] = ndimage.generate_binary_structure(2, 1)
    lab, _ = ndimage.label(~m, structure=plane)
    edge = []
    for ax in range(3):
        if ax != axial_axis:
            edge += [np.take(lab, 0, axis=ax).ravel(), np.take(lab, -1, axis=ax).ravel()]
    outside = np.zeros(lab.max() + 1, dtype=bool)
    outside[np.concatenate(edge)] = True
    outside[0] = False  # label 0 is the body itself
    return ~outside[lab]


def grow(mask: np.ndarray, img: sitk.Image, mm: float) -> np.ndarray:
    """Dilate a (z, y, x) ``mask`` on ``img``'s grid by a ball of ``mm`` (at least one voxel per axis when
    ``mm > 0``; unchanged when ``mm <= 0``); SimpleITK's dilation is 5x faster than scipy's here."""
    if mm <= 0:
        return mask
    radius = [max(1, int(round(mm / s))) for s in img.GetSpacing()]
    return sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), radius,
                                                    sitk.sitkBall)) > 0


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of ``a`` and ``b`` inside ``mask``: NaN with fewer than two voxels
    (module docstring), 0 where either side is constant."""
    if mask.sum() < 2:
        return float("nan")
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (NaN when both are empty)."""
    n = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / n if n else float("nan")
