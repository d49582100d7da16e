"""Geometry shared by registration and synthesis: body masks, world coordinates, the (array, affine) adapter, NCC."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.amplify.geometry import (affine_of, body_mask_array, dice, grid_world_points, grow, image_from_affine,
                                    in_slab, ncc, world_points, world_z)


def test_body_mask_drops_table_and_fills_lungs():
    hu = np.full((20, 40, 40), -1000.0)
    z, y, x = np.indices(hu.shape)
    hu[((y - 18) ** 2 + (x - 20) ** 2) <= 12 ** 2] = 40.0  # body cylinder along z (array axis 0)
    hu[((y - 15) ** 2 + (x - 14) ** 2) <= 3 ** 2] = -850.0  # a lung inside
    hu[:, 34, 2:38] = 100.0  # a thin table below, not touching
    hu[:, 31:34, 20] = 100.0  # ...and a one-voxel strut joining it to the body
    m = body_mask_array(hu, axial_axis=0)
    assert m[:, 15, 14].all()  # lung filled
    assert not m[:, 34, 5].any()  # table gone
    assert m.sum() == pytest.approx((((y - 18) ** 2 + (x - 20) ** 2) <= 12 ** 2).sum(), rel=0.02)


def _oblique_affine() -> np.ndarray:
    """A voxel -> world affine with anisotropic spacing, a rotation and a flip (no axis-aligned shortcut works)."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])
    a = np.eye(4)
    a[:3, :3] = rot * np.array([1.5, 2.0, 3.0])
    a[:3, 3] = (10.0, -20.0, 30.0)
    return a


def test_the_array_affine_adapter_and_world_coordinates_agree():
    affine = _oblique_affine()
    arr_xyz = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = image_from_affine(arr_xyz, affine)
    assert img.GetSize() == (4, 5, 6)
    np.testing.assert_allclose(affine_of(img), affine, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), arr_xyz.transpose(2, 1, 0))
    # SimpleITK's own index -> world mapping is what both coordinate functions compute.
    pts = grid_world_points(arr_xyz.shape, affine)
    np.testing.assert_allclose(pts[3, 1, 4], img.TransformIndexToPhysicalPoint((3, 1, 4)), atol=1e-9)
    mask = np.zeros((6, 5, 4), dtype=bool)  # (z, y, x)
    mask[4, 1, 3] = True
    np.testing.assert_allclose(world_points(mask, img)[0], pts[3, 1, 4], atol=1e-9)
    np.testing.assert_allclose(world_z(img), pts[..., 2].transpose(2, 1, 0), atol=1e-4)
    z = pts[..., 2].transpose(2, 1, 0)
    slab = in_slab(img, (20.0, 30.0), tz=2.0)  # z = 30, 27, ..., 15 mm: the atlas stretch moved by -2 mm
    np.testing.assert_array_equal(slab, (z >= 18.0) & (z <= 28.0))
    assert slab.any() and not slab.all()


def test_ncc_of_an_empty_or_single_voxel_mask_is_nan_not_the_whole_volume():
    """Registration and synthesis share one rule: no common body, no similarity (a NaN fails every threshold)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4, 4))
    empty = np.zeros(a.shape, dtype=bool)
    assert np.isnan(ncc(a, a, empty))
    one = empty.copy()
    one[0, 0, 0] = True
    assert np.isnan(ncc(a, a, one))
    assert ncc(a, a, ~empty) == pytest.approx(1.0)
    assert ncc(a, -a, ~empty) == pytest.approx(-1.0)
    assert ncc(a, np.ones_like(a), ~empty) == 0.0  # constant side: no correlation, not a division by zero
    assert np.isnan(dice(empty, empty)) and dice(~empty, ~empty) == 1.0


def test_grow_dilates_by_millimetres_per_axis_and_not_at_all_for_zero():
    img = sitk.Image(21, 21, 21, sitk.sitkUInt8)
    img.SetSpacing((1.0, 2.0, 5.0))
    mask = np.zeros((21, 21, 21), dtype=bool)
    mask[10, 10, 10] = True
    assert grow(mask, img, 0.0) is mask
    g = grow(mask, img, 4.0)  # 4 voxels along x, 2 along y, 1 (at least one) along z
    assert g[10, 10, 6] and not g[10, 10, 5]
    assert g[10, 8, 10] and not g[10, 7, 10]
    assert g[9, 10, 10] and not g[8, 10, 10]
