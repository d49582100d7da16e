"""Site loading: layouts, partial annotations, and one clear error per kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from fadal_testing import LABELS, make_volume, write_site
from fadal.data.io import read_image, write_image
from fadal.errors import FadalInputError
from fadal.data.site import load_site


def test_nnunet_layout_splits_labeled_unlabeled_test(tiny_site):
    site = load_site(tiny_site)
    assert [c.case_id for c in site.labeled] == ["case_000", "case_001"]
    assert [c.case_id for c in site.unlabeled] == ["case_002"]
    assert [c.case_id for c in site.test] == ["case_003"]
    assert site.labeled[0].annotated == ["organA", "organB"]
    assert site.num_classes == 3 and site.organs == ["organA", "organB"]


def test_msd_layout(tmp_path):
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    img, seg = make_volume()
    sitk.WriteImage(img, str(root / "imagesTr" / "a.nii.gz"))
    sitk.WriteImage(seg, str(root / "labelsTr" / "a.nii.gz"))
    sitk.WriteImage(img, str(root / "imagesTr" / "b.nii.gz"))
    json.dump({"labels": {"0": "background", "1": "organA", "2": "organB"},
               "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
                            {"image": "./imagesTr/b.nii.gz"}]}, open(root / "dataset.json", "w"))
    site = load_site(root)
    assert site.labels == LABELS
    assert [c.case_id for c in site.labeled] == ["a"] and [c.case_id for c in site.unlabeled] == ["b"]


def test_partial_annotation_from_cases_json(tmp_path):
    root = write_site(tmp_path / "s", n_labeled=1, n_unlabeled=0, n_test=0)
    # The label file must then not contain organB: rewrite it without.
    lab = read_image(root / "labelsTr" / "case_000.nii.gz")
    arr = sitk.GetArrayFromImage(lab)
    arr[arr == 2] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    write_image(out, root / "labelsTr" / "case_000.nii.gz")
    json.dump({"case_000": {"annotated": ["organA"]}}, open(root / "cases.json", "w"))
    site = load_site(root)
    assert site.labeled[0].annotated == ["organA"]
    assert site.annotated_ids(site.labeled[0]) == [1]


def _expect(root, *fragments):
    with pytest.raises(FadalInputError) as err:
        load_site(root)
    msg = str(err.value)
    for f in fragments:
        assert f in msg, msg
    assert "\n" not in msg


def test_error_geometry_mismatch(tiny_site):
    lab = read_image(tiny_site / "labelsTr" / "case_001.nii.gz")
    lab.SetOrigin((5.0, 0.0, 0.0))
    write_image(lab, tiny_site / "labelsTr" / "case_001.nii.gz")
    _expect(tiny_site, "case_001.nii.gz", "geometry differs", "origin")


def test_error_size_mismatch(tiny_site):
    img, _ = make_volume(shape=(20, 20, 16))
    _, seg = make_volume()
    write_image(img, tiny_site / "imagesTr" / "case_000_0000.nii.gz")
    _expect(tiny_site, "labelsTr/case_000.nii.gz", "size")


def test_error_unknown_label_values(tiny_site):
    lab = read_image(tiny_site / "labelsTr" / "case_000.nii.gz")
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 9
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    write_image(out, tiny_site / "labelsTr" / "case_000.nii.gz")
    _expect(tiny_site, "case_000.nii.gz", "unknown label values [9]")


def test_error_nan_volume(tiny_site):
    img = sitk.Cast(read_image(tiny_site / "imagesTr" / "case_002_0000.nii.gz"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[3, 3, 3] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    write_image(out, tiny_site / "imagesTr" / "case_002_0000.nii.gz")
    _expect(tiny_site, "case_002_0000.nii.gz", "NaN")


def test_error_constant_volume(tiny_site):
    img = read_image(tiny_site / "imagesTr" / "case_000_0000.nii.gz")
    out = sitk.Image(img.GetSize(), img.GetPixelID())
    out.CopyInformation(img)
    write_image(out, tiny_site / "imagesTr" / "case_000_0000.nii.gz")
    _expect(tiny_site, "case_000_0000.nii.gz", "constant volume")


def test_error_unreadable_file(tiny_site):
    (tiny_site / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _expect(tiny_site, "case_001_0000.nii.gz", "unreadable")


def test_error_truncated_file(tiny_site):
    """A half-copied .nii.gz (or .nii) reads in ITK as a volume whose missing part is zeros: refused."""
    path = tiny_site / "imagesTr" / "case_002_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    _expect(tiny_site, "case_002_0000.nii.gz", "truncated")
    raw = tiny_site / "imagesTr" / "case_002_0000.nii"
    path.unlink()
    img, _ = make_volume(seed=2)
    sitk.WriteImage(img, str(raw))
    raw.write_bytes(raw.read_bytes()[:-100])
    _expect(tiny_site, "case_002_0000.nii", "truncated file")


def test_error_missing_annotated_organ(tiny_site):
    lab = read_image(tiny_site / "labelsTr" / "case_000.nii.gz")
    arr = sitk.GetArrayFromImage(lab)
    arr[arr == 2] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    write_image(out, tiny_site / "labelsTr" / "case_000.nii.gz")
    _expect(tiny_site, "case_000.nii.gz", "['organB']", "no voxels")


def test_error_unknown_organ_in_cases_json(tiny_site):
    json.dump({"case_000": {"annotated": ["liver"]}}, open(tiny_site / "cases.json", "w"))
    _expect(tiny_site, "cases.json", "unknown organs ['liver']")


def test_error_missing_dataset_json(tiny_site):
    (tiny_site / "dataset.json").unlink()
    _expect(tiny_site, "dataset.json", "missing")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    img, _ = make_volume()
    target = tmp_path / "out.nii.gz"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(RuntimeError):
        write_image(img, target)
    assert list(tmp_path.iterdir()) == []


def test_cases_json_split_decides_a_training_case_role(tiny_site):
    """THE rule (data.site.training_role), for every stage: split "unlabeled" makes a scan unlabeled even
    with a label file; "test" holds a labeled scan out; a split that needs a label without one is an error."""
    json.dump({"case_001": {"split": "unlabeled"}, "case_000": {"split": "test"}}, open(tiny_site / "cases.json", "w"))
    site = load_site(tiny_site)
    assert site.labeled == []
    assert [(c.case_id, c.label, c.annotated) for c in site.unlabeled] == [("case_001", None, []), ("case_002", None, [])]
    assert [c.case_id for c in site.test] == ["case_000", "case_003"]
    for split in ("test", "labeled", "train"):
        json.dump({"case_002": {"split": split}}, open(tiny_site / "cases.json", "w"))
        _expect(tiny_site, "cases.json", "case_002", f"split '{split}'", "no label file")
    (tiny_site / "cases.json").write_text('{"case_002": ')
    _expect(tiny_site, "cases.json", "not valid JSON")
