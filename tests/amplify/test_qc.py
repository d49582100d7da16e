"""Quality control of pseudo-labels: flags, the accept / demote / reject rule, and what training skips."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from fadal.amplify.qc import OrganReference, atlas_reference, check_pseudo_label, demote, volume_ranges
from fadal.config import QCConfig
from fadal.records import Fingerprint, Percentiles

NAMES = {1: "liver", 2: "kidney", 3: "spine"}


def _ball(shape, centre, radius):
    z, y, x = np.indices(shape)
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius ** 2


def _case():
    """A pseudo-label with a plausible liver (1) and kidney (2), and its references (1 ml voxels)."""
    shape = (30, 30, 30)
    label = np.zeros(shape, np.uint8)
    label[_ball(shape, (10, 15, 15), 6)] = 1  # 925 voxels
    label[_ball(shape, (22, 15, 15), 4)] = 2  # 257 voxels
    conf = np.where(label > 0, 0.9, 1.0).astype(np.float32)
    ref = {1: OrganReference([800.0, 1000.0], 1), 2: OrganReference([250.0], 1), 3: OrganReference([50.0], 1)}
    return label, conf, ref


def test_plausible_organs_pass():
    label, conf, ref = _case()
    res = check_pseudo_label(label, conf, 1.0, [1, 2], ref, NAMES, QCConfig())
    assert res.accepted and res.kept == [1, 2] and res.demoted == [] and res.reasons == []
    assert res.organs["liver"]["volume_range_ml"] == [round(800 / 3, 2), 3000.0]  # the default prior f = 3
    assert res.organs["liver"]["largest_parts_fraction"] == 1.0


def test_implausible_volume_fragmented_missing_and_low_confidence_are_flagged():
    label, conf, ref = _case()
    big = label.copy()
    big[_ball(label.shape, (10, 15, 15), 12) & (label == 0)] = 1  # liver of ~5000 ml: > 1000 * 3
    res = check_pseudo_label(big, conf, 1.0, [1, 2, 3], ref, NAMES, QCConfig())
    assert res.organs["liver"]["flags"] == ["volume"] and "outside" in res.reasons[1]
    assert res.organs["spine"]["flags"] == ["missing"]  # fused from atlases, absent here
    # 2 of 3 organs flagged > max_flagged_fraction 0.5: the whole scan is rejected.
    assert not res.accepted and "2 of 3 organs flagged" in res.reasons[0]

    broken = label.copy()
    broken[(broken == 2)] = 0
    for k, z in enumerate((4, 12, 20, 27)):  # kidney in four equal pieces
        broken[_ball(label.shape, (z, 4 + 7 * k, 25), 2)] = 2
    low = conf.copy()
    low[label == 1] = 0.55
    res = check_pseudo_label(broken, low, 1.0, [1, 2], {**ref, 2: OrganReference([100.0], 1)}, NAMES,
                             QCConfig(max_flagged_fraction=1.0))
    assert res.organs["kidney"]["flags"] == ["fragmented"]
    assert res.organs["kidney"]["largest_parts_fraction"] < 0.3
    assert res.organs["liver"]["flags"] == ["low_confidence"]
    assert not res.accepted and res.reasons == ["2 of 2 organs flagged (max_flagged_fraction 1)",
                                                 *res.reasons[1:]]  # none left

    # A label covering a pair of organs (two parts in the atlases) is not fragmented in two parts.
    pair = label.copy()
    pair[_ball(label.shape, (22, 15, 5), 4)] = 2
    ok = check_pseudo_label(pair, conf, 1.0, [1, 2], {**ref, 2: OrganReference([500.0], 2)}, NAMES, QCConfig())
    assert ok.accepted and ok.organs["kidney"]["flags"] == []


def test_flagged_organ_is_demoted_or_rejects_the_scan():
    label, conf, ref = _case()
    conf[label == 2] = 0.5
    res = check_pseudo_label(label, conf, 1.0, [1, 2, 3], {**ref, 3: OrganReference([], 1)}, NAMES,
                             QCConfig(volume_factor=1.5))
    # spine is missing and kidney unsure: 2 of 3 > 0.5 -> rejected; with a looser rule both are demoted.
    assert not res.accepted
    res = check_pseudo_label(label, conf, 1.0, [1, 2, 3], ref, NAMES, QCConfig(max_flagged_fraction=0.7))
    assert res.accepted and res.kept == [1] and res.demoted == [2, 3]
    assert res.to_record(NAMES).demoted == ["kidney", "spine"]
    lab, c = demote(label, conf, res.demoted)
    assert (lab == 2).sum() == 0 and (lab == 1).sum() == (label == 1).sum()
    assert np.all(c[label == 2] == 0) and np.all(c[label == 1] == conf[label == 1])
    # Without demotion any flag rejects; with QC off everything passes.
    assert not check_pseudo_label(label, conf, 1.0, [1, 2], ref, NAMES, QCConfig(demote_flagged=False)).accepted
    off = check_pseudo_label(label, conf, 1.0, [1, 2, 3], ref, NAMES, QCConfig(enabled=False))
    assert off.accepted and off.kept == [1, 2, 3]


def test_atlas_reference_counts_only_atlases_that_drew_the_organ(tmp_path):
    label, _, _ = _case()
    paths = []
    for i, spacing in enumerate((1.0, 2.0)):
        img = sitk.GetImageFromArray(label)
        img.SetSpacing((spacing,) * 3)
        paths.append(tmp_path / f"a{i}.nii.gz")
        sitk.WriteImage(img, str(paths[-1]))
    ref = atlas_reference(paths, [{1, 2}, {1}], [1, 2, 3])
    n1, n2 = int((label == 1).sum()), int((label == 2).sum())
    np.testing.assert_allclose(ref[1].volumes_ml, [n1 / 1000, n1 * 8 / 1000])
    np.testing.assert_allclose(ref[2].volumes_ml, [n2 / 1000])  # atlas 1 did not draw organ 2
    assert ref[3].volumes_ml == [] and ref[1].parts == 1


def test_federation_volume_ranges_widen_what_two_atlases_allow():
    label, conf, ref = _case()
    large = label.copy()
    large[_ball(label.shape, (10, 15, 15), 8) & (label == 0)] = 1  # liver of ~2100 ml; atlases 800-1000 ml
    tight = QCConfig(volume_factor=1.5)
    assert check_pseudo_label(large, conf, 1.0, [1, 2], ref, NAMES, tight).organs["liver"]["flags"] == ["volume"]
    p = Percentiles(p10=(1.0, 1.0, 1.0), p50=(1.0, 1.0, 1.0), p90=(1.0, 1.0, 1.0))
    fp = Fingerprint(scans=40, labeled_scans=40, spacing_mm=p, body_extent_mm=p,
                     organ_volume_ml={"liver": (600.0, 2400.0), "spine": (0.0, 80.0)})
    ranges = volume_ranges(fp)
    assert ranges == {"liver": (600.0, 2400.0)}  # a zero minimum (organ outside a field of view) says nothing
    res = check_pseudo_label(large, conf, 1.0, [1, 2], ref, NAMES, tight.model_copy(update={"volume_ranges_ml": ranges}))
    assert res.accepted and res.organs["liver"]["flags"] == [] and res.organs["liver"]["volume_range_ml"] == [480.0, 3000.0]  # federation_volume_factor 1.25


def test_organ_on_the_wrong_tissue_is_flagged_by_its_intensity(tmp_path):
    label, conf, _ = _case()
    scan = np.where(label == 1, 60.0, np.where(label == 2, 30.0, -1000.0)).astype(np.float32)
    paths = {}  # 1 mm voxels: 0.001 ml
    for name, arr in (("label", label), ("scan", scan)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(paths[name]))
    ref = atlas_reference([paths["label"]], [{1, 2}], [1, 2], [paths["scan"]])
    assert ref[1].median_hu == [60.0] and ref[2].median_hu == [30.0]
    same = check_pseudo_label(label, conf, 0.001, [1, 2], ref, NAMES, QCConfig(), image_hu=scan)
    assert same.accepted and same.organs["liver"]["flags"] == [] and same.organs["liver"]["hu_difference"] == 0
    moved = np.where(label == 1, 0, label)
    moved[np.roll(label == 1, 8, axis=2)] = 1  # the liver shifted (within the grid) off its tissue, into the air
    res = check_pseudo_label(moved, conf, 0.001, [1, 2], ref, NAMES, QCConfig(), image_hu=scan)
    assert res.organs["liver"]["flags"] == ["intensity"] and res.demoted == [1]
    assert "HU" in res.reasons[0]
    # Without the scan the check is not made (the volume is unchanged by a shift).
    assert check_pseudo_label(moved, conf, 0.001, [1, 2], ref, NAMES, QCConfig()).organs["liver"]["flags"] == []
