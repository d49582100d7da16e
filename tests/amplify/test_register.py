"""Atlas registration on synthetic phantoms with known anatomy (real elastix runs, small and fast)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.amplify.register import RegistrationResult, pair_key, register_atlas, register_many
from fadal.data.io import FadalInputError, resample_like

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
    assert RegistrationResult.from_json(stored).warped_label == res.warped_label

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
