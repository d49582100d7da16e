"""DICOM SEG export on the real 20-slice CT series: same frame of reference, one segment per organ present,
and pixel data that matches the label map voxel for voxel in world coordinates."""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from fadal.data.dicom import list_series, read_dicom_series
from fadal.data.io import resample_like
from fadal.errors import FadalInputError
from fadal.navigation.dicom_seg import _property_type, write_dicom_seg

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def case(totalseg):
    labels = json.loads((totalseg / "labels.json").read_text())["labels"]
    folder = totalseg / "example_ct_dicom"
    ct = read_dicom_series(folder)
    raw = sitk.ReadImage(str(totalseg / "example_seg_dicom.nii.gz"))
    label = resample_like(raw, ct, is_label=True)  # through world coordinates, nearest neighbour
    return folder, labels, ct, raw, label


@pytest.fixture(scope="module")
def seg_file(case, tmp_path_factory):
    folder, labels, _, _, label = case
    return write_dicom_seg(label, folder, labels, tmp_path_factory.mktemp("seg") / "seg.dcm")


def volume_as_image(volume: hd.Volume) -> sitk.Image:
    """highdicom Volume (array (slice, row, column), affine to LPS) -> SimpleITK image, exactly."""
    affine = np.asarray(volume.affine, dtype=float)
    columns = affine[:3, :3]  # index (slice, row, column) -> world
    spacing = np.linalg.norm(columns, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))  # sitk (x, y, z) = (column, row, slice)
    image.SetSpacing(tuple(spacing[::-1]))
    image.SetDirection(tuple((columns / spacing)[:, ::-1].ravel()))
    image.SetOrigin(tuple(affine[:3, 3]))
    return image


def corners(image: sitk.Image) -> set[tuple[float, ...]]:
    """World positions (mm, rounded) of the 8 corner voxel centres: equal sets = the same voxel grid."""
    last = np.array(image.GetSize()) - 1
    return {tuple(np.round(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in np.array(c) * last)), 3))
            for c in np.ndindex(2, 2, 2)}


def test_seg_references_ct_and_lists_present_organs(case, seg_file):
    folder, labels, _, _, label = case
    seg = hd.seg.segread(seg_file)
    files = next(iter(list_series(folder).values()))
    ct_first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == ct_first.FrameOfReferenceUID
    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(label))}
    organs = [name for name, v in labels.items() if v in present and v != 0]
    assert seg.number_of_segments == len(organs) > 0
    assert [s.SegmentLabel for s in seg.SegmentSequence] == sorted(organs, key=labels.get)
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "FADAL"
    liver = next(s for s in seg.SegmentSequence if s.SegmentLabel == "liver")
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.SegmentationType == "BINARY"
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    ct_uids = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in files}
    assert referenced == ct_uids


def test_seg_pixels_match_label_voxel_for_voxel(case, seg_file):
    _, labels, ct, _, label = case
    seg = hd.seg.segread(seg_file)
    arr = sitk.GetArrayFromImage(label)
    for organ in ("liver", "aorta"):
        number = next(s.SegmentNumber for s in seg.SegmentSequence if s.SegmentLabel == organ)
        volume = seg.get_volume(segment_numbers=[number], combine_segments=True, relabel=True)
        image = volume_as_image(volume)
        # The SEG volume may be stored in another slice order: compare on the label's grid through world
        # coordinates; the grids coincide, so nearest-neighbour resampling only reorders voxels.
        assert corners(image) == corners(label)
        on_grid = sitk.GetArrayFromImage(resample_like(image, label, is_label=True))
        expected = (arr == labels[organ]).astype(np.uint8)
        assert expected.sum() > 0
        np.testing.assert_array_equal(on_grid, expected)


def test_seg_independent_of_label_slice_order(case, seg_file, tmp_path):
    """A label stored bottom-up or top-down is the same segmentation: frames are matched by position."""
    folder, labels, _, _, label = case
    flipped = sitk.DICOMOrient(label, "LPI")  # same voxels in the world, slice axis reversed
    assert flipped.GetDirection() != label.GetDirection()
    other = write_dicom_seg(flipped, folder, labels, tmp_path / "flipped.dcm")
    a, b = hd.seg.segread(seg_file), hd.seg.segread(other)
    uids = [u for _, _, u in a.get_source_image_uids()]
    pa = a.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    pb = b.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert pa.any()
    np.testing.assert_array_equal(pa, pb)


def test_label_off_the_series_grid_is_refused(case, tmp_path):
    folder, labels, _, raw, _ = case
    with pytest.raises(FadalInputError, match="not on the DICOM series' grid"):
        write_dicom_seg(raw, folder, labels, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


def test_property_codes():
    kidney, side = _property_type("kidney_right")
    assert (kidney.value, side.meaning) == ("64033007", "Right")
    assert _property_type("spleen")[0].value == "78961009"
    assert _property_type("portal_vein_and_splenic_vein")[0].meaning == "Portal vein"
    assert _property_type("mystery_structure")[0].meaning == "Organ"
