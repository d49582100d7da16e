"""Fingerprints (aggregate, in canonical axes) and the planner's rules."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.config import PlannerConfig
from fadal.data.site import load_site
from fadal.plan.fingerprint import merge_fingerprints, site_fingerprint
from fadal.plan.planner import CPU_SECONDS_PER_VOXEL, make_plan, mirror_pairs, target_spacing
from fadal.records import Fingerprint, IntensityStats, Percentiles
from fadal_testing import LABELS, make_volume, write_site


def _fp(spacing=(1.0, 1.0, 5.0), p10_z=2.0, extent=(300.0, 200.0, 400.0), scans=10, hu=(-100.0, 300.0)) -> Fingerprint:
    return Fingerprint(
        scans=scans, labeled_scans=scans,
        spacing_mm=Percentiles(p10=(spacing[0], spacing[1], p10_z), p50=spacing, p90=spacing),
        body_extent_mm=Percentiles(p10=extent, p50=extent, p90=extent),
        foreground_hu=IntensityStats(p00_5=hu[0], p50=40.0, p99_5=hu[1], mean=50.0, std=30.0),
        organ_volume_ml={"liver": (1000.0, 2000.0)})


def test_site_fingerprint_measures_in_canonical_axes_and_keeps_test_scans_out(tmp_path):
    root = write_site(tmp_path / "site", n_labeled=2, n_unlabeled=1, n_test=1)
    # Store one scan with permuted axes (coronal-like): its spacing must land on the same world axes.
    img, seg = make_volume(shape=(24, 16, 20), spacing=(2.0, 3.0, 2.0), direction=(1, 0, 0, 0, 0, 1, 0, -1, 0))
    sitk.WriteImage(img, str(root / "imagesTr" / "case_000_0000.nii.gz"))
    sitk.WriteImage(seg, str(root / "labelsTr" / "case_000.nii.gz"))
    fp = site_fingerprint(load_site(root))
    assert fp.scans == 3 and fp.labeled_scans == 2
    assert fp.spacing_mm.p50 == (2.0, 2.0, 3.0)
    assert fp.foreground_hu is not None and 60 < fp.foreground_hu.p50 < 170  # the organs are 80 and 150 HU
    lo, hi = fp.organ_volume_ml["organA"]
    assert 0 < lo <= hi


def test_merge_weights_percentiles_by_scans_and_unites_ranges():
    a = _fp(spacing=(1.0, 1.0, 5.0), scans=30)
    b = _fp(spacing=(2.0, 2.0, 1.0), scans=10).model_copy(update={"organ_volume_ml": {"liver": (500.0, 1500.0),
                                                                                        "spleen": (100.0, 300.0)}})
    m = merge_fingerprints([a, b])
    assert m.sites == 2 and m.scans == 40
    assert m.spacing_mm.p50 == pytest.approx((1.25, 1.25, 4.0))
    assert m.organ_volume_ml == {"liver": (500.0, 2000.0), "spleen": (100.0, 300.0)}


def test_spacing_is_the_median_and_the_thick_axis_of_anisotropic_scans_takes_its_10th_percentile():
    assert target_spacing(_fp(spacing=(1.0, 1.0, 2.5))) == (1.0, 1.0, 2.5)
    assert target_spacing(_fp(spacing=(1.0, 1.0, 5.0), p10_z=2.0)) == (1.0, 1.0, 2.0)


def test_the_patch_fits_the_budget_the_network_divides_it_and_cpu_gets_the_unet():
    fp = _fp(spacing=(2.0, 2.0, 2.0), extent=(400.0, 300.0, 400.0))
    for minutes in (5.0, 25.0, 60.0):
        cfg = PlannerConfig(budget_minutes=minutes, device="cpu")
        plan = make_plan(fp, LABELS, cfg)
        voxels = int(np.prod(plan.patch_size))
        assert all(p % plan.network.divisor == 0 for p in plan.patch_size)
        assert voxels * cfg.batch_size * cfg.min_steps * CPU_SECONDS_PER_VOXEL <= minutes * 60
        assert max(plan.patch_size) <= cfg.max_patch_side
        assert plan.network.architecture == "unet" and plan.preprocess.spacing_mm == (2.0, 2.0, 2.0)
        assert plan.preprocess.hu_window == (-100.0, 300.0)
    small, large = (make_plan(fp, LABELS, PlannerConfig(budget_minutes=m, device="cpu")) for m in (5.0, 60.0))
    assert np.prod(small.patch_size) < np.prod(large.patch_size)
    gpu = make_plan(fp, LABELS, PlannerConfig(device="cuda"))
    assert gpu.network.architecture == "dynunet" and gpu.network.deep_supervision > 0


def test_overrides_and_mirror_pairs_by_name():
    labels = {"background": 0, "LeftParotid": 1, "RightParotid": 2, "kidney_left": 3, "kidney_right": 4, "liver": 5}
    assert mirror_pairs(labels) == [(1, 2), (3, 4)]
    plan = make_plan(_fp(), labels, PlannerConfig(spacing_mm=(3.0, 3.0, 3.0), patch_size=(32, 48, 64),
                                                  channels=(8, 16, 32), mirror=True, device="cpu"))
    assert plan.preprocess.spacing_mm == (3.0, 3.0, 3.0) and plan.patch_size == (32, 48, 64)
    assert plan.network.channels == (8, 16, 32) and plan.mirror_pairs == [(1, 2), (3, 4)]
    assert make_plan(_fp(), labels, PlannerConfig(device="cpu")).mirror_pairs == []  # off unless asked
    with pytest.raises(ValueError, match="multiples of 4"):
        make_plan(_fp(), labels, PlannerConfig(patch_size=(30, 32, 32), channels=(8, 16, 32), device="cpu"))
