"""Organ meshes: on the label boundary in world coordinates (whatever the grid's direction), closed, written
in formats 3D Slicer reads with their coordinate system stated."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk
import trimesh
from navigation_phantom import ELLIPSOID_CENTRE, ELLIPSOID_RADII, SPACING, SPHERE_CENTRE, SPHERE_RADIUS, SYNTH_LABELS
from scipy import ndimage
from scipy.spatial import cKDTree

from fadal.errors import FadalInputError
from fadal.navigation.meshes import index_to_world, organ_meshes, postprocess_label, write_meshes


def boundary_points(label: sitk.Image, value: int) -> np.ndarray:
    """World coordinates of the organ's boundary voxel centres (voxels with a 6-neighbour outside)."""
    mask = sitk.GetArrayFromImage(label) == value
    boundary = mask & ~ndimage.binary_erosion(mask)
    return index_to_world(label, np.argwhere(boundary)[:, ::-1])


@pytest.fixture(scope="module")
def synthetic_meshes(synthetic):
    return organ_meshes(synthetic.label, SYNTH_LABELS)


def test_vertices_on_label_boundary_in_world_coordinates(synthetic, synthetic_meshes):
    voxel = max(SPACING)
    assert set(synthetic_meshes) == {"liver", "spleen"}
    for name, mesh in synthetic_meshes.items():
        dist, _ = cKDTree(boundary_points(synthetic.label, SYNTH_LABELS[name])).query(mesh.vertices)
        assert dist.max() <= voxel, name
        assert dist.mean() < 0.5 * voxel, name


def test_closed_outward_and_volume_matches_voxels(synthetic, synthetic_meshes):
    arr = sitk.GetArrayViewFromImage(synthetic.label)
    for name, mesh in synthetic_meshes.items():
        assert mesh.is_watertight and mesh.is_winding_consistent, name
        assert mesh.volume > 0, name  # outward normals give a positive signed volume
        voxel_volume = float((arr == SYNTH_LABELS[name]).sum() * np.prod(SPACING))
        assert mesh.volume == pytest.approx(voxel_volume, rel=0.10), name
        assert mesh.metadata["label_volume_ml"] == pytest.approx(voxel_volume / 1000)
        outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - mesh.center_mass)
        assert (outward > 0).mean() > 0.95, name


def test_sphere_centre_and_ellipsoid_axes_in_world(synthetic_meshes):
    """The grid's axes are flipped and permuted: the shapes must still land where they are in the world."""
    sphere, ellipsoid = synthetic_meshes["liver"], synthetic_meshes["spleen"]
    np.testing.assert_allclose(sphere.center_mass, SPHERE_CENTRE, atol=0.1 * min(SPACING))
    np.testing.assert_allclose(ellipsoid.center_mass, ELLIPSOID_CENTRE, atol=0.25 * max(SPACING))
    # Extents along world x, y, z follow the ellipsoid's radii (10, 14, 20): a swapped axis would fail this.
    np.testing.assert_allclose(np.ptp(ellipsoid.vertices, axis=0), 2 * ELLIPSOID_RADII, atol=max(SPACING))
    np.testing.assert_allclose(np.ptp(sphere.vertices, axis=0), [2 * SPHERE_RADIUS] * 3, atol=max(SPACING))


def test_absent_organs_and_background_skipped(synthetic):
    meshes = organ_meshes(synthetic.label, {"background": 0, "liver": 1, "pancreas": 7}, target_faces=None)
    assert list(meshes) == ["liver"]


def test_write_meshes_files_and_json(synthetic_meshes, tmp_path):
    out = write_meshes(synthetic_meshes, tmp_path / "meshes")
    assert set(out) == {"liver", "spleen"}
    liver = synthetic_meshes["liver"]
    stl, obj, vtp = out["liver"]
    assert [p.suffix for p in out["liver"]] == [".stl", ".obj", ".vtp"]
    assert b"SPACE=LPS" in stl.read_bytes()[:80]
    assert "SPACE=LPS" in obj.read_text().splitlines()[0]
    for path in (stl, obj):
        loaded = trimesh.load(path, force="mesh")
        assert loaded.is_watertight
        assert loaded.volume == pytest.approx(liver.volume, rel=1e-4)
        np.testing.assert_allclose(loaded.bounds, liver.bounds, atol=1e-3)
    # VTP: parse the XML ourselves (no VTK needed) and check points, triangles and the SPACE field.
    root = ET.parse(vtp).getroot()
    piece = root.find("PolyData/Piece")
    assert int(piece.get("NumberOfPoints")) == len(liver.vertices)
    assert int(piece.get("NumberOfPolys")) == len(liver.faces)
    points = np.array(piece.find("Points/DataArray").text.split(), float).reshape(-1, 3)
    np.testing.assert_allclose(points, liver.vertices, atol=1e-4)
    conn = np.array(piece.find("Polys/DataArray[@Name='connectivity']").text.split(), int).reshape(-1, 3)
    np.testing.assert_array_equal(conn, liver.faces)
    space = root.find("PolyData/FieldData/Array[@Name='SPACE']").text.split()
    assert bytes(int(c) for c in space[:-1]) == b"LPS" and space[-1] == "0"

    info = json.loads((tmp_path / "meshes" / "meshes.json").read_text())
    assert info["coordinate_system"] == "LPS" and info["units"] == "mm"
    assert "Slicer" in info["note"]
    entry = info["organs"]["liver"]
    assert entry["vertices"] == len(liver.vertices) and entry["faces"] == len(liver.faces)
    assert entry["mesh_volume_ml"] == pytest.approx(liver.volume / 1000, abs=1e-3)
    assert entry["label_volume_ml"] == pytest.approx(entry["mesh_volume_ml"], rel=0.1)
    assert not list((tmp_path / "meshes").glob(".tmp_*"))


def test_vtp_readable_by_vtk(synthetic_meshes, tmp_path):
    vtk = pytest.importorskip("vtk")
    out = write_meshes({"liver": synthetic_meshes["liver"]}, tmp_path, formats=("vtp",))
    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(str(out["liver"][0]))
    reader.Update()
    poly = reader.GetOutput()
    assert poly.GetNumberOfPolys() == len(synthetic_meshes["liver"].faces)
    assert poly.GetFieldData().GetAbstractArray("SPACE").GetValue(0) == "LPS"


def test_write_meshes_ras(synthetic_meshes, tmp_path):
    out = write_meshes(synthetic_meshes, tmp_path, formats=("stl",), coordinate_system="RAS")
    loaded = trimesh.load(out["liver"][0], force="mesh")
    np.testing.assert_allclose(loaded.center_mass, SPHERE_CENTRE * [-1, -1, 1], atol=0.2)
    assert loaded.volume > 0
    assert b"SPACE=RAS" in out["liver"][0].read_bytes()[:80]
    with pytest.raises(FadalInputError):
        write_meshes(synthetic_meshes, tmp_path, coordinate_system="XYZ")
    with pytest.raises(FadalInputError):
        write_meshes(synthetic_meshes, tmp_path, formats=("ply",))


def test_postprocess_label_keeps_largest_and_fills_holes(synthetic):
    arr = sitk.GetArrayFromImage(synthetic.label)
    dirty = arr.copy()
    zc, yc, xc = (int(v) for v in np.argwhere(arr == 1).mean(axis=0))
    dirty[zc, yc, xc] = 0  # a hole inside organ 1
    dirty[1:3, 1:3, 1:3] = 1  # a stray island of organ 1
    image = sitk.GetImageFromArray(dirty)
    image.CopyInformation(synthetic.label)
    clean = postprocess_label(image)
    assert clean.GetDirection() == synthetic.label.GetDirection()
    assert clean.GetOrigin() == synthetic.label.GetOrigin()
    assert clean.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(clean), arr)
    kept = sitk.GetArrayFromImage(postprocess_label(image, largest_component=False, fill_holes=False))
    np.testing.assert_array_equal(kept, dirty)


def test_postprocess_does_not_fill_with_other_organs(synthetic):
    arr = sitk.GetArrayFromImage(synthetic.label)
    zc, yc, xc = (int(v) for v in np.argwhere(arr == 1).mean(axis=0))
    arr[zc - 1:zc + 2, yc - 1:yc + 2, xc - 1:xc + 2] = 2  # organ 2 enclosed by organ 1 (a vessel in the liver)
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(synthetic.label)
    out = sitk.GetArrayFromImage(postprocess_label(image, largest_component=False))
    assert (out[zc - 1:zc + 2, yc - 1:yc + 2, xc - 1:xc + 2] == 2).all()


@pytest.mark.shared_data
def test_totalseg_meshes_on_boundary(totalseg):
    labels = json.loads((totalseg / "labels.json").read_text())["labels"]
    label = sitk.ReadImage(str(totalseg / "example_seg.nii.gz"))
    organs = {k: labels[k] for k in ("liver", "spleen", "kidney_right", "kidney_left")}
    meshes = organ_meshes(label, organs)
    assert set(meshes) == set(organs)
    voxel = max(label.GetSpacing())
    for name, mesh in meshes.items():
        dist, _ = cKDTree(boundary_points(label, organs[name])).query(mesh.vertices)
        assert dist.mean() < voxel, name
        assert dist.max() <= 1.5 * voxel, name
        assert mesh.is_watertight, name
        assert mesh.volume / 1000 == pytest.approx(mesh.metadata["meshed_voxel_volume_ml"], rel=0.1), name
