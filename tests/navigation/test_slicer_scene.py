"""The Slicer files of a case: the .seg.nrrd header keys parse (read with pynrrd, independently of the writer)
and its voxels sit where the label map's do in world coordinates; the scene references files that exist."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.navigation.slicer import write_scene, write_seg_nrrd
from navigation_phantom import SYNTH_LABELS

nrrd = pytest.importorskip("nrrd")


def test_seg_nrrd_header_and_world_geometry(synthetic, tmp_path):
    label = synthetic.label  # flipped, permuted grid: any axis mix-up shows
    path = write_seg_nrrd(label, {**SYNTH_LABELS, "kidney": 7}, tmp_path / "case.seg.nrrd")
    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    arr = sitk.GetArrayFromImage(label)  # (z, y, x)
    for i, name in enumerate(["liver", "spleen"]):  # kidney is not present: no segment
        value = SYNTH_LABELS[name]
        assert header[f"Segment{i}_Name"] == header[f"Segment{i}_ID"] == name
        assert int(header[f"Segment{i}_LabelValue"]) == value and header[f"Segment{i}_Layer"] == "0"
        color = [float(c) for c in header[f"Segment{i}_Color"].split()]
        assert len(color) == 3 and all(0 <= c <= 1 for c in color)
        x0, x1, y0, y1, z0, z1 = (int(v) for v in header[f"Segment{i}_Extent"].split())
        idx = np.argwhere(arr == value)
        assert (z0, y0, x0) == tuple(idx.min(0)) and (z1, y1, x1) == tuple(idx.max(0))
    assert "Segment2_Name" not in header
    # World coordinates from the NRRD header alone (pynrrd's data is indexed x, y, z) vs the label map's.
    directions, origin = np.asarray(header["space directions"], float), np.asarray(header["space origin"], float)
    assert data.shape == label.GetSize()
    assert np.array_equal(data.transpose(2, 1, 0), arr)
    for value in (1, 2):
        ijk = np.argwhere(data == value)
        world_nrrd = origin + ijk @ directions  # rows of "space directions" are the index axes' steps
        world_label = np.asarray([label.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in ijk[::97]])
        assert np.allclose(world_nrrd[::97], world_label, atol=1e-4)
        # ... and those are the phantom's own world coordinates of that organ.
        assert np.allclose(world_nrrd[::97], synthetic.world[ijk[::97, 2], ijk[::97, 1], ijk[::97, 0]], atol=1e-3)


def test_scene_references_the_ct_the_segmentation_and_the_meshes(tmp_path):
    for name in ("ct.nii.gz", "case.seg.nrrd", "liver.vtp"):
        (tmp_path / name).write_text("x")
    scene = write_scene(tmp_path / "scene.mrml", tmp_path / "ct.nii.gz", tmp_path / "case.seg.nrrd",
                        {"liver": tmp_path / "liver.vtp"}, {"liver": (0.8, 0.3, 0.2)})
    root = ET.parse(scene).getroot()
    assert root.tag == "MRML"
    files = {e.tag: e.get("fileName") for e in root if e.get("fileName")}
    assert files == {"VolumeArchetypeStorage": "ct.nii.gz", "SegmentationStorage": "case.seg.nrrd",
                     "ModelStorage": "liver.vtp"}
    ids = {e.get("id") for e in root}
    for e in root:  # every reference names a node of the scene
        for attr in ("storageNodeRef", "displayNodeRef"):
            assert e.get(attr) is None or e.get(attr) in ids
    assert next(e for e in root if e.tag == "ModelStorage").get("coordinateSystem") == "LPS"
