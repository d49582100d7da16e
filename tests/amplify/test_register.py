"""Atlas registration on synthetic phantoms with known anatomy (real elastix runs, small and fast)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.amplify.cache import pair_key
from fadal.amplify.elastix import RegistrationFailed
from fadal.amplify.register import register_atlas, register_many
from fadal.amplify.result import RegistrationResult, registration_failure, registration_failures
from fadal.config import RegistrationConfig
from fadal.data.io import resample_like
from fadal.errors import FadalInputError

pytestmark = [
    pytest.mark.usefixtures("one_itk_thread"),
    pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning"),  # SWIG, on importing itk
]


def _assert_same_grid(img: sitk.Image, ref: sitk.Image) -> None:
    assert img.GetSize() == ref.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-9)


def test_register_atlas_aligns_labels_and_caches(phantom_pair, tmp_path, fast_cfg, dice_score):
    p = phantom_pair
    cfg = fast_cfg()
    out = tmp_path / "reg"
    res = register_atlas(p["fixed"], p["atlas"], p["atlas_label"], out, cfg)
    assert not res.cached and res.seconds > 0

    fixed = sitk.ReadImage(str(p["fixed"]))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(p["fixed_label"])))
    warped = sitk.ReadImage(str(res.warped_label))
    _assert_same_grid(warped, fixed)
    assert warped.GetPixelID() == sitk.sitkUInt8

    unregistered = resample_like(sitk.ReadImage(str(p["atlas_label"])), fixed, is_label=True)
    d0 = dice_score(sitk.GetArrayFromImage(unregistered), truth)
    d1 = dice_score(sitk.GetArrayFromImage(warped), truth)
    assert d1 > 0.8, (d0, d1)
    assert d1 > d0 + 0.15, (d0, d1)
    assert -1 <= res.metric_before < res.metric_after <= 1
    assert res.metric_after > 0.5

    stored = json.loads((out / f"{res.key}.json").read_text())
    assert RegistrationResult.from_json(stored["result"]).warped_label == res.warped_label

    t0 = time.perf_counter()
    again = register_atlas(p["fixed"], p["atlas"], p["atlas_label"], out, cfg.model_copy(update={"workers": 3}))
    assert again.cached and time.perf_counter() - t0 < 1.0
    assert again.warped_label == res.warped_label
    assert again.metric_after == pytest.approx(res.metric_after)
    # Any setting that changes the result changes the key.
    assert pair_key(p["fixed"], p["atlas"], p["atlas_label"], cfg.model_copy(update={"seed": 1})) != res.key


@pytest.mark.slow  # two spawned workers each load ITK's elastix module (10-20 s, more on a busy machine)
def test_register_many_two_workers(phantom_pair, tmp_path, fast_cfg):
    p = phantom_pair
    cfg = fast_cfg(workers=2)
    out = tmp_path / "reg"
    good = [(p["fixed"], p["atlas"], p["atlas_label"]), (p["atlas"], p["fixed"], p["fixed_label"])]
    bad = (p["fixed"], p["atlas"], p["fixed_label"])  # label not on its image's grid
    seen = []
    with pytest.raises(FadalInputError) as err:
        register_many(good + [bad], out, cfg, progress=seen.append)
    msg = str(err.value)
    assert "1 of 3" in msg and str(p["atlas"]) in msg and str(p["fixed"]) in msg and "geometry" in msg
    assert len(seen) == 2  # the good pairs finished and reported despite the failure

    t0 = time.perf_counter()
    results = register_many(good, out, cfg)
    assert time.perf_counter() - t0 < 2.0  # all cached: no worker process started
    assert [r.cached for r in results] == [True, True]
    assert [(r.fixed, r.moving) for r in results] == [g[:2] for g in good]
    for r, (fixed, _, _) in zip(results, good):
        _assert_same_grid(sitk.ReadImage(str(r.warped_label)), sitk.ReadImage(str(fixed)))
        assert r.metric_after > r.metric_before


# --------------------------------------------------------------------------------------------------
# robustness: body masks, initialisation, failure detection
# --------------------------------------------------------------------------------------------------

def _cropped_target(tmp_path, phantom):
    """Atlas: a whole phantom body (56^3 at 4 mm). Target: another subject, its body 40/30 mm off the
    centre of its field of view (64^3), of which only a craniocaudal slab (z in [-102, 10] mm of the
    body) was scanned, stored with an unrelated origin: centre alignment is off by ~70 mm."""
    atlas, atlas_lab = phantom(56, 4.0, warp_mm=3.0, seed=2)
    target, target_lab = phantom(64, 4.0, shift_mm=(40.0, 30.0, 0.0), seed=1)
    target, target_lab = target[:, :, 6:34], target_lab[:, :, 6:34]
    for im in (target, target_lab):
        im.SetOrigin((40.0, -30.0, 250.0))
    paths = {}
    for name, im in {"fixed": target, "fixed_label": target_lab, "atlas": atlas, "atlas_label": atlas_lab}.items():
        paths[name] = tmp_path / "crop" / f"{name}.nii.gz"
        paths[name].parent.mkdir(exist_ok=True)
        sitk.WriteImage(im, str(paths[name]))
    # Fixed point x shows the atlas anatomy at x + t (origin -126 mm before the crop, 6 slices cut).
    expected_t = np.array([-126.0 - 40.0 - 40.0, -126.0 + 30.0 - 30.0, -126.0 + 24.0 - 250.0])
    return paths, expected_t


def test_search_initialisation_registers_a_cropped_shifted_target(phantom, tmp_path, fast_cfg, dice_score):
    p, expected_t = _cropped_target(tmp_path, phantom)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(p["fixed_label"])))
    results = {}
    for init in ("geometric_center", "search"):
        cfg = fast_cfg(initialization=init)
        res = register_atlas(p["fixed"], p["atlas"], p["atlas_label"], tmp_path / "reg", cfg)
        results[init] = dice_score(sitk.GetArrayFromImage(sitk.ReadImage(str(res.warped_label))), truth), res
    (d_search, res), (d_centre, centre) = results["search"], results["geometric_center"]
    assert d_search > 0.8 and d_centre < 0.3, (d_search, d_centre)
    assert np.abs(np.asarray(res.init_translation_mm) - expected_t).max() < 15.0, res.init_translation_mm
    assert not res.metric_before > 0.3  # before: the scans hardly overlap in world space (NaN if not at all)
    assert res.metric_init > 0.5 and res.metric_after > 0.5
    # The target is a slab of the atlas's body: it is covered, and the body masks agree.
    assert res.overlap > 0.95 and res.body_dice > 0.95
    assert registration_failure(res, fast_cfg()) is None
    assert registration_failure(centre, fast_cfg()) is not None  # centre alignment's failure is caught


def test_flipped_atlas_is_detected_as_failed(phantom_pair, tmp_path, fast_cfg):
    """An atlas whose voxels are upside down (header unchanged: the anatomy is wrong in world space).
    Detected either by elastix giving up or by the thresholds; either way it is a failed atlas."""
    p = phantom_pair
    atlas = sitk.ReadImage(str(p["atlas"]))
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(atlas)[::-1, ::-1])
    flipped.CopyInformation(atlas)
    path = tmp_path / "flipped.nii.gz"
    sitk.WriteImage(flipped, str(path))
    cfg = fast_cfg()
    pairs = [(p["fixed"], p["atlas"], p["atlas_label"]), (p["fixed"], path, p["atlas_label"])]
    good, bad = register_many(pairs, tmp_path / "reg", cfg, errors="record")
    assert registration_failure(good, cfg) is None
    assert registration_failure(bad, cfg) is not None, (bad.metric_after, bad.body_dice)


def test_failure_thresholds_are_applied_at_use_and_not_in_the_cache_key(phantom_pair, fast_cfg):
    cfg = fast_cfg()
    f = phantom_pair["fixed"]
    ok = RegistrationResult(fixed=f, moving=f, warped_label=f, metric_before=0.1, metric_after=0.6, seconds=1.0,
                            cached=False, body_dice=0.95, overlap=0.9)
    assert registration_failure(ok, cfg) is None
    for field, value, word in (("metric_after", 0.2, "NCC"), ("body_dice", 0.2, "body-mask Dice"),
                               ("overlap", 0.1, "covers"), ("metric_after", float("nan"), "NCC")):
        bad = RegistrationResult(**{**ok.__dict__, field: value})
        assert word in registration_failure(bad, cfg)
    assert registration_failure(RegistrationResult(**{**ok.__dict__, "metric_after": 0.2}),
                                cfg.model_copy(update={"min_ncc": 0.1})) is None
    args = (phantom_pair["fixed"], phantom_pair["atlas"], phantom_pair["atlas_label"])
    relaxed = cfg.model_copy(update={"min_ncc": 0.0, "min_body_dice": 0.0, "min_overlap": 0.0, "workers": 3})
    assert pair_key(*args, relaxed) == pair_key(*args, cfg)
    assert pair_key(*args, cfg.model_copy(update={"initialization": "center_of_gravity"})) != pair_key(*args, cfg)


def test_an_atlas_far_below_the_best_on_its_scan_counts_as_failed(phantom_pair):
    """The calibrated rule (benchmarks/registration_calibration.py): an atlas whose NCC is below
    min_ncc_ratio x the best atlas's on the same scan fails, though above every absolute floor."""
    f = phantom_pair["fixed"]
    base = dict(fixed=f, moving=f, warped_label=f, metric_before=0.1, seconds=1.0, cached=False, body_dice=0.95,
                overlap=0.9)
    best, close, far = (RegistrationResult(**base, metric_after=v) for v in (0.8, 0.7, 0.5))
    failed = RegistrationResult(**{**base, "metric_after": float("nan"), "error": "elastix gave up"})
    cfg = RegistrationConfig()
    why = registration_failures([best, close, far, failed], cfg)
    assert why[:2] == [None, None] and "min_ncc_ratio" in why[2] and why[3] == "elastix gave up"
    assert registration_failure(far, cfg) is None  # alone it passes every floor
    assert registration_failures([far], cfg) == [None]  # the best atlas of its scan is never flagged by the ratio
    assert registration_failures([best, far], cfg.model_copy(update={"min_ncc_ratio": 0.5})) == [None, None]


def test_register_many_records_elastix_failures(phantom_pair, tmp_path, fast_cfg, monkeypatch):
    import fadal.amplify.register as reg

    def boom(*args, **kwargs):
        raise RegistrationFailed("elastix gave up (Too many samples map outside moving image buffer)")

    monkeypatch.setattr(reg, "_register_uncached", boom)
    p = phantom_pair
    pairs = [(p["fixed"], p["atlas"], p["atlas_label"])]
    with pytest.raises(FadalInputError, match="1 of 1"):
        register_many(pairs, tmp_path / "reg", fast_cfg())
    (res,) = register_many(pairs, tmp_path / "reg", fast_cfg(), errors="record")
    assert res.error and res.warped_label is None and "Too many samples" in registration_failure(res, fast_cfg())
