"""DICOM series input: the real example reads in the right geometry; broken exports get clear errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from fadal.data.dicom import read_dicom_series
from fadal.errors import FadalInputError


def _copy_series(src, dest, series_uid=None, modality=None, skip=()):
    dest.mkdir(parents=True)
    files = sorted(p for p in src.iterdir() if p.is_file())
    for k, f in enumerate(files):
        if k in skip:
            continue
        ds = pydicom.dcmread(f)
        if series_uid:
            ds.SeriesInstanceUID = series_uid
        if modality:
            ds.Modality = modality
        ds.save_as(dest / f.name)
    return dest


@pytest.fixture
def series(shared_data):
    return shared_data / "totalseg_example" / "example_ct_dicom"


def test_real_series_geometry_and_hu(series, shared_data):
    image = read_dicom_series(series)
    assert image.GetSize() == (512, 512, 20)
    assert np.allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    hu = sitk.GetArrayViewFromImage(image)
    assert hu.min() <= -1000 and hu.max() > 1000  # rescaled to HU, air and bone
    # The reference label (on another grid) overlaps the series' physical extent.
    seg = sitk.ReadImage(str(shared_data / "totalseg_example" / "example_seg_dicom.nii.gz"))
    centre = seg.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in seg.GetSize()])
    idx = image.TransformPhysicalPointToContinuousIndex(centre)
    assert all(-1 <= i <= n for i, n in zip(idx, image.GetSize()))


def test_several_series_are_listed(series, tmp_path):
    folder = tmp_path / "two"
    _copy_series(series, folder / "a", series_uid="1.2.3.4.1")
    _copy_series(series, folder / "b", series_uid="1.2.3.4.2")
    for f in (folder / "b").iterdir():  # both series side by side in one folder
        f.rename(folder / f"b_{f.name}")
    for f in (folder / "a").iterdir():
        f.rename(folder / f"a_{f.name}")
    with pytest.raises(FadalInputError) as err:
        read_dicom_series(folder)
    assert "2 DICOM series" in str(err.value) and "1.2.3.4.1" in str(err.value) and "1.2.3.4.2" in str(err.value)
    assert read_dicom_series(folder, "1.2.3.4.2").GetSize()[2] == 20


def test_missing_slice_is_refused(series, tmp_path):
    folder = _copy_series(series, tmp_path / "gap", skip=(10,))
    with pytest.raises(FadalInputError, match="uneven slice spacing"):
        read_dicom_series(folder)


def test_non_ct_modality_is_refused(series, tmp_path):
    folder = _copy_series(series, tmp_path / "mr", modality="MR")
    with pytest.raises(FadalInputError, match="modality is MR"):
        read_dicom_series(folder)


def test_empty_folder(tmp_path):
    with pytest.raises(FadalInputError, match="no DICOM series"):
        read_dicom_series(tmp_path)
