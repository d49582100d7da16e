"""Known-answer tests of multi-atlas fusion (majority vote with partial annotations)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.amplify.fuse import (fuse_files, fused_classes, joint_vote, local_log_weights, majority_vote, staple_fusion,
                               weighted_vote)
from fadal.amplify.joint_fusion import joint_weights
from fadal.errors import FadalInputError


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
        fuse_files(paths, ref, 3, method="bogus")


# --------------------------------------------------------------------------------------------------
# weighted voting and STAPLE
# --------------------------------------------------------------------------------------------------

def _ball(shape, centre, radius):
    z, y, x = np.indices(shape)
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius ** 2


def _known_answer_case():
    """Truth: a ball (organ 1, 60 HU in a 0 HU body). Atlas 0 is registered right; atlases 1 and 2
    were misregistered 7 voxels up and down: their labels and their warped scans are shifted alike.
    A strict majority keeps only voxels two atlases share, which erodes the ball at both poles."""
    shape, centre, radius = (40, 24, 24), (20, 12, 12), 7
    truth = _ball(shape, centre, radius).astype(np.uint8)
    rng = np.random.default_rng(0)
    target = np.where(truth == 1, 60.0, 0.0) + rng.normal(0, 5, shape)
    labels, images = [], []
    for dz in (0, 7, -7):
        lab = np.roll(truth, dz, axis=0)
        labels.append(lab)
        images.append(np.where(lab == 1, 60.0, 0.0) + rng.normal(0, 5, shape))
    return truth, target, labels, images


def _dice1(a, b):
    return 2.0 * np.logical_and(a == 1, b == 1).sum() / ((a == 1).sum() + (b == 1).sum())


def test_weighted_vote_downweights_misregistered_atlases():
    truth, target, labels, images = _known_answer_case()
    majority, _ = majority_vote(labels, 2)
    log_w = local_log_weights(target, images, (1.0, 1.0, 1.0), sigma_hu=30.0, radius_mm=2.0)
    weighted, conf = weighted_vote(labels, log_w, 2)
    d_major, d_weighted = _dice1(majority, truth), _dice1(weighted, truth)
    assert d_weighted > 0.97 and d_weighted > d_major + 0.1, (d_major, d_weighted)
    assert conf.min() >= 0 and conf.max() <= 1
    # Equal weights are exactly the majority rule.
    equal, equal_conf = weighted_vote(labels, [np.zeros(truth.shape, np.float32)] * 3, 2)
    np.testing.assert_array_equal(equal, majority)
    np.testing.assert_allclose(equal_conf, majority_vote(labels, 2)[1], atol=1e-6)
    # Weights far below exp(-100) everywhere still normalise (no 0/0).
    low, _ = weighted_vote(labels, [w - 1e4 for w in log_w], 2)
    np.testing.assert_array_equal(low, weighted)


def test_staple_beats_majority_when_good_atlases_are_outnumbered_locally():
    truth, _, labels, _ = _known_answer_case()
    # Two faithful atlases and the two misregistered ones: a strict majority needs 3 of 4.
    four = [labels[0], labels[0].copy(), labels[1], labels[2]]
    majority, _ = majority_vote(four, 2)
    staple, conf = staple_fusion(four, 2)
    assert _dice1(staple, truth) > 0.97 and _dice1(staple, truth) > _dice1(majority, truth) + 0.1
    assert conf.dtype == np.float32 and conf.min() >= 0 and conf.max() <= 1
    # Unanimous atlases: STAPLE returns them, with full confidence.
    same, same_conf = staple_fusion([truth, truth, truth], 2)
    np.testing.assert_array_equal(same, truth)
    assert same_conf.min() > 0.99


def test_joint_fusion_is_not_outvoted_by_atlases_that_err_together():
    """Joint label fusion (Wang et al. 2013). Atlases 1 and 2 are misregistered 7 voxels apart; then
    the misregistered atlas is duplicated (two atlases making the same error). Measured over target
    noise seeds 0-4: joint 1.000 in both cases; majority 0.756 / 0.304; locally weighted 0.994-0.997 /
    0.981-0.986."""
    truth, target, labels, images = _known_answer_case()
    joint, conf = joint_vote(labels, target, images, (1.0, 1.0, 1.0), 2, radius_mm=2.0)
    assert _dice1(joint, truth) > 0.99 > _dice1(majority_vote(labels, 2)[0], truth) + 0.2
    assert conf.dtype == np.float32 and conf.min() >= 0 and conf.max() <= 1
    same = [labels[0], labels[1], labels[1].copy()]
    joint_dup, _ = joint_vote(same, target, [images[0], images[1], images[1].copy()], (1.0, 1.0, 1.0), 2,
                              radius_mm=2.0)
    assert _dice1(joint_dup, truth) > 0.99 > 0.5 > _dice1(majority_vote(same, 2)[0], truth)
    # Unanimous atlases: their label, whatever the scans look like.
    unanimous, u_conf = joint_vote([truth] * 3, target, images, (1.0, 1.0, 1.0), 2)
    np.testing.assert_array_equal(unanimous, truth)
    assert u_conf.min() == 1.0
    # The weights of one voxel sum to 1; an atlas identical to the target gets nearly all of it.
    where = np.zeros(truth.shape, bool)
    where[20, 12, 12] = True
    w = joint_weights(target, [target, images[1], images[2]], where, (1.0, 1.0, 1.0), radius_mm=2.0)
    assert w.shape == (3, 1) and w.sum() == pytest.approx(1.0) and w[0, 0] > 0.9


@pytest.mark.parametrize("method", ["majority", "weighted", "staple", "joint"])
def test_partial_annotation_respected_by_every_method(method):
    # Organ 2 (a ball) is drawn by atlas 0 only; atlases 1 and 2 drew organ 1 only and say 0 there.
    shape = (20, 20, 20)
    organ1, organ2 = _ball(shape, (6, 10, 10), 4), _ball(shape, (14, 10, 10), 4)
    full = np.where(organ1, 1, np.where(organ2, 2, 0)).astype(np.uint8)
    only1 = np.where(organ1, 1, 0).astype(np.uint8)
    labels, annotated = [full, only1, only1.copy()], [{1, 2}, {1}, {1}]
    if method == "majority":
        label, _ = majority_vote(labels, 3, annotated)
        blind, _ = majority_vote(labels, 3)
    elif method == "staple":
        label, _ = staple_fusion(labels, 3, annotated)
        blind, _ = staple_fusion(labels, 3)
    elif method == "joint":
        scan = np.where(organ1, 60.0, np.where(organ2, 120.0, 0.0))
        label, _ = joint_vote(labels, scan, [scan] * 3, (1.0, 1.0, 1.0), 3, annotated)
        blind, _ = joint_vote(labels, scan, [scan] * 3, (1.0, 1.0, 1.0), 3)
    else:
        scan = np.where(organ1, 60.0, np.where(organ2, 120.0, 0.0))
        log_w = local_log_weights(scan, [scan] * 3, (1.0, 1.0, 1.0))
        label, _ = weighted_vote(labels, log_w, 3, annotated)
        blind, _ = weighted_vote(labels, log_w, 3)
    np.testing.assert_array_equal(label, full)
    assert (blind == 2).sum() == 0  # counting "not drawn" as background would erase organ 2


def test_fuse_files_weighted_needs_warped_scans(tmp_path):
    truth, target, labels, images = _known_answer_case()
    ref = sitk.GetImageFromArray(target.astype(np.float32))
    ref.SetSpacing((1.0, 1.0, 1.0))
    lpaths, ipaths = [], []
    for i, (lab, im) in enumerate(zip(labels, images)):
        for arr, dest in ((lab, lpaths), (im.astype(np.float32), ipaths)):
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(ref)
            dest.append(tmp_path / f"{'l' if dest is lpaths else 'i'}{i}.nii.gz")
            sitk.WriteImage(img, str(dest[-1]))
    with pytest.raises(FadalInputError, match="image_paths"):
        fuse_files(lpaths, ref, 2, method="weighted")
    label, conf = fuse_files(lpaths, ref, 2, method="weighted", image_paths=ipaths, sigma_hu=30.0, radius_mm=2.0)
    assert _dice1(sitk.GetArrayFromImage(label), truth) > 0.97
    with pytest.raises(FadalInputError, match="image_paths"):
        fuse_files(lpaths, ref, 2, method="joint")
    label, conf = fuse_files(lpaths, ref, 2, method="joint", image_paths=ipaths, joint={"radius_mm": 2.0})
    assert _dice1(sitk.GetArrayFromImage(label), truth) > 0.99
    label, conf = fuse_files(lpaths, ref, 2, method="staple")
    assert label.GetPixelID() == sitk.sitkUInt8 and conf.GetPixelID() == sitk.sitkFloat32
