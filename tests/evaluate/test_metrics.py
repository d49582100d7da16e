"""Per-organ metrics against cases whose answers are known analytically."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.errors import FadalInputError
from fadal.evaluate.metrics import organ_metrics, summarize

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
# Anisotropic and different on every axis, so a spacing passed in the wrong axis order shows up.
SPACING = (0.8, 1.0, 3.0)  # (x, y, z) in mm, SimpleITK order
SHAPE = (24, 24, 24)  # (z, y, x), numpy order


def image(arr: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def cube(z=5, y=5, x=5, side=10, value=1, arr=None) -> np.ndarray:
    arr = np.zeros(SHAPE, np.uint8) if arr is None else arr
    arr[z:z + side, y:y + side, x:x + side] = value
    return arr


def test_identical_masks_are_perfect():
    ref = cube()
    out = organ_metrics(image(ref), image(ref), LABELS)
    assert out == {"liver": {"dice": 1.0, "hd95": 0.0, "surface_dice": 1.0}}


def test_shift_along_z_gives_analytic_dice_and_hd95_in_mm():
    # 10^3 cube shifted by 2 voxels along z: overlap 8*10*10 -> Dice = 2*800/2000 = 0.8.
    # Faces 2 slices apart along z, z spacing 3 mm -> HD95 = 6 mm (x/y spacing would give 1.6 or 2 mm).
    ref, pred = cube(z=5), cube(z=7)
    out = organ_metrics(image(pred), image(ref), LABELS)["liver"]
    assert out["dice"] == pytest.approx(0.8, abs=1e-9)
    assert out["hd95"] == pytest.approx(6.0, abs=1e-4)
    assert 0.0 < out["surface_dice"] < 1.0  # 2 mm tolerance < 6 mm shift for part of the surface
    # Every surface distance is <= 6 mm, so a 6 mm tolerance accepts the whole surface.
    assert organ_metrics(image(pred), image(ref), LABELS, tolerance_mm=6.0)["liver"]["surface_dice"] == 1.0


def test_shift_along_x_uses_x_spacing():
    ref, pred = cube(x=5), cube(x=7)
    out = organ_metrics(image(pred), image(ref), LABELS, tolerance_mm=1.0)["liver"]
    assert out["dice"] == pytest.approx(0.8, abs=1e-9)
    assert out["hd95"] == pytest.approx(2 * 0.8, abs=1e-4)
    assert out["surface_dice"] < 1.0
    assert organ_metrics(image(pred), image(ref), LABELS, tolerance_mm=1.6)["liver"]["surface_dice"] == 1.0


def test_empty_prediction_and_absent_organs_conventions():
    ref = cube(value=1)
    cube(z=1, y=1, x=1, side=3, value=2, arr=ref)  # spleen in the reference only
    pred = cube(value=1)
    cube(z=18, y=18, x=18, side=3, value=3, arr=pred)  # kidney in the prediction only
    out = organ_metrics(image(pred), image(ref), LABELS)
    assert list(out) == ["liver", "spleen"]  # kidney absent from ref: skipped; background never scored
    assert out["liver"]["dice"] == 1.0
    assert out["spleen"] == {"dice": 0.0, "hd95": None, "surface_dice": 0.0}
    json.dumps(out, allow_nan=False)  # no NaN/inf anywhere


def test_organs_restricts_scoring():
    ref = cube(value=1)
    cube(z=1, y=1, x=1, side=3, value=2, arr=ref)
    out = organ_metrics(image(ref), image(ref), LABELS, organs={"spleen"})
    assert list(out) == ["spleen"]
    with pytest.raises(FadalInputError, match="pancreas"):
        organ_metrics(image(ref), image(ref), LABELS, organs=["pancreas"])


@pytest.mark.parametrize(
    "kwargs, word",
    [({"spacing": (0.8, 1.0, 2.5)}, "spacing"), ({"origin": (0.0, 0.0, 5.0)}, "origin")],
)
def test_geometry_mismatch_raises(kwargs, word):
    ref = cube()
    with pytest.raises(FadalInputError, match=word):
        organ_metrics(image(ref, **kwargs), image(ref), LABELS)


def test_size_mismatch_raises():
    ref = cube()
    with pytest.raises(FadalInputError, match="size"):
        organ_metrics(image(ref[:-1]), image(ref), LABELS)


def test_summarize_means_ignore_none_and_count_cases():
    per_case = {
        "c1": {"liver": {"dice": 0.8, "hd95": 4.0, "surface_dice": 0.9},
               "spleen": {"dice": 0.0, "hd95": None, "surface_dice": 0.0}},
        "c2": {"liver": {"dice": 0.6, "hd95": 2.0, "surface_dice": 0.7},
               "spleen": {"dice": 0.5, "hd95": 10.0, "surface_dice": 0.4}},
        "c3": {"liver": {"dice": 1.0, "hd95": None, "surface_dice": 0.5}},
    }
    s = summarize(per_case)
    assert list(s) == ["liver", "spleen", "mean"]
    assert s["liver"]["dice"] == pytest.approx(0.8)
    assert s["liver"]["hd95"] == pytest.approx(3.0)  # None ignored
    assert s["liver"]["surface_dice"] == pytest.approx(0.7)
    assert s["liver"]["n"] == 3
    assert s["spleen"] == {"dice": pytest.approx(0.25), "hd95": pytest.approx(10.0),
                           "surface_dice": pytest.approx(0.2), "n": 2}
    assert s["mean"]["dice"] == pytest.approx((0.8 + 0.25) / 2)
    assert s["mean"]["hd95"] == pytest.approx((3.0 + 10.0) / 2)
    assert s["mean"]["n"] == 3


def test_summarize_all_none_gives_none_not_nan():
    s = summarize({"c1": {"liver": {"dice": 0.0, "hd95": None, "surface_dice": 0.0}}})
    assert s["liver"]["hd95"] is None and s["mean"]["hd95"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for row in s.values() for v in row.values())
    assert summarize({}) == {}
