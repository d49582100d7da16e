"""Known-answer tests of multi-atlas fusion (majority vote with partial annotations)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.amplify.fuse import fuse_files, fused_classes, majority_vote
from fadal.data.io import FadalInputError


def test_full_annotation_majority_and_confidence():
    a = np.array([[0, 1, 1, 2, 0, 1]])
    b = np.array([[0, 1, 2, 2, 1, 1]])
    c = np.array([[0, 0, 2, 2, 2, 2]])
    label, conf = majority_vote([a, b, c], num_classes=3)
    assert label.dtype == np.uint8 and conf.dtype == np.float32
    # voxel: all bg | 2 of 3 say 1 | 1 vs 2:2 -> 2 | unanimous 2 | 1,1,1 split three ways | 2 of 3 say 1
    np.testing.assert_array_equal(label, [[0, 1, 2, 2, 0, 1]])
    third = np.float32(1.0) / np.float32(3.0)
    np.testing.assert_array_equal(
        conf, np.array([[1.0, 2 * third, 2 * third, 1.0, 1.0 - third, 2 * third]], dtype=np.float32)
    )


def test_strict_majority_threshold_and_ties():
    # Two atlases: a 1-vs-1 split is not a strict majority -> background with confidence 0.5.
    a = np.array([1, 1, 2, 0])
    b = np.array([1, 0, 1, 0])
    label, conf = majority_vote([a, b], num_classes=3)
    np.testing.assert_array_equal(label, [1, 0, 0, 0])
    np.testing.assert_array_equal(conf, np.array([1.0, 0.5, 0.5, 1.0], dtype=np.float32))
    # Four atlases, 2 say organ 2, 2 say organ 1: tie -> candidate 1 (lowest id), 0.5 is not > 0.5.
    four = [np.array([1]), np.array([1]), np.array([2]), np.array([2])]
    label, conf = majority_vote(four, num_classes=3)
    assert label[0] == 0 and conf[0] == np.float32(0.5)
    # Three of four: strict majority.
    label, conf = majority_vote([np.array([2]), np.array([2]), np.array([2]), np.array([0])], num_classes=3)
    assert label[0] == 2 and conf[0] == np.float32(0.75)


def test_partial_annotation_unknown_is_not_background():
    # Organ 2 is drawn only by atlases 0 and 1 (both say 2); atlas 2 only drew organ 1 and says 0.
    a0 = np.array([2, 1, 0, 2])
    a1 = np.array([2, 1, 0, 0])
    a2 = np.array([0, 1, 1, 0])
    annotated = [{1, 2}, {1, 2}, {1}]
    label, conf = majority_vote([a0, a1, a2], num_classes=3, annotated=annotated)
    np.testing.assert_array_equal(label, [2, 1, 0, 0])
    third = np.float32(1.0) / np.float32(3.0)
    np.testing.assert_array_equal(conf, np.array([1.0, 1.0, 1.0 - third, 0.5], dtype=np.float32))
    # Without the annotation information atlas 2's 0 counts against organ 2 (2/3 still wins here)...
    label_all, conf_all = majority_vote([a0, a1, a2], num_classes=3)
    assert label_all[0] == 2 and conf_all[0] == np.float32(2 * third)
    # ...and with one of two organ-2 atlases it would lose: annotation awareness keeps it.
    b = [np.array([2]), np.array([0]), np.array([0])]
    assert majority_vote(b, 3)[0][0] == 0
    assert majority_vote(b, 3, annotated=[{2}, {1}, {1}])[0][0] == 2


def test_label_for_undeclared_class_is_ignored_and_unannotated_class_not_fused():
    # Atlas 1 says 2 but declares only organ 1: no vote. No atlas annotates organ 3.
    a0 = np.array([0, 1])
    a1 = np.array([2, 1])
    label, conf = majority_vote([a0, a1], num_classes=4, annotated=[{1, 2}, {1}])
    np.testing.assert_array_equal(label, [0, 1])
    np.testing.assert_array_equal(conf, np.array([1.0, 1.0], dtype=np.float32))
    assert fused_classes(4, [{1, 2}, {1}], 2) == [1, 2]
    assert fused_classes(4, None, 2) == [1, 2, 3]


def test_bad_inputs_are_reported():
    with pytest.raises(FadalInputError, match="outside"):
        majority_vote([np.array([0, 5])], num_classes=3)
    with pytest.raises(FadalInputError, match="shape"):
        majority_vote([np.zeros(3, int), np.zeros(4, int)], num_classes=2)
    with pytest.raises(FadalInputError, match="entries"):
        majority_vote([np.zeros(3, int)], num_classes=2, annotated=[{1}, {1}])


def test_fuse_files_keeps_reference_geometry(tmp_path):
    ref = sitk.Image(6, 5, 4, sitk.sitkInt16)
    ref.SetSpacing((1.5, 2.0, 3.0))
    ref.SetOrigin((10.0, -20.0, 5.0))
    ref.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    rng = np.random.default_rng(0)
    paths, arrays = [], []
    for i in range(3):
        arr = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ref)
        paths.append(tmp_path / f"l{i}.nii.gz")
        sitk.WriteImage(img, str(paths[-1]))
        arrays.append(arr)
    label, conf = fuse_files(paths, ref, num_classes=3)
    for im in (label, conf):
        assert im.GetSize() == ref.GetSize()
        assert np.allclose(im.GetSpacing(), ref.GetSpacing())
        assert np.allclose(im.GetOrigin(), ref.GetOrigin())
        assert np.allclose(im.GetDirection(), ref.GetDirection())
    assert label.GetPixelID() == sitk.sitkUInt8 and conf.GetPixelID() == sitk.sitkFloat32
    want_label, want_conf = majority_vote(arrays, 3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), want_label)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(conf), want_conf)
    with pytest.raises(FadalInputError, match="method"):
        fuse_files(paths, ref, 3, method="staple")
