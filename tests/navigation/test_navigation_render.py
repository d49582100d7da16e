"""Renders: PNGs of the expected size, not blank, anatomically oriented, and independent of how the volume is
stored (flipped axes)."""

from __future__ import annotations

import json
import time

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk
from navigation_phantom import SYNTH_LABELS

from fadal.navigation.meshes import organ_meshes
from fadal.navigation.render import (ORGAN_COLORS, OVERLAY_SIZE_IN, RENDER_SIZE_IN, _DPI, organ_color,
                                     overlay_views, render_views)

#: Pure colours make the organs easy to find in the pictures.
PURE = {"liver": (1.0, 0.0, 0.0), "spleen": (0.0, 0.0, 1.0)}


def read_png(path):
    return mpimg.imread(str(path))[..., :3]


def where(rgb: np.ndarray, channel: int) -> np.ndarray:
    """(row, col) of pixels clearly dominated by one colour channel."""
    others = np.delete(rgb, channel, axis=-1).max(axis=-1)
    return np.argwhere(rgb[..., channel] - others > 0.2)


@pytest.fixture(scope="module")
def meshes(synthetic):
    return organ_meshes(synthetic.label, SYNTH_LABELS)


def test_render_views_files(meshes, tmp_path):
    paths = render_views(meshes, tmp_path)
    assert set(paths) == {"anterior", "oblique"}
    for path in paths.values():
        img = read_png(path)
        assert img.shape[:2] == (int(RENDER_SIZE_IN[1] * _DPI), int(RENDER_SIZE_IN[0] * _DPI))
        assert img.std() > 0.05  # not blank
    assert not list(tmp_path.glob(".tmp_*"))


def test_anterior_view_orientation(meshes, tmp_path):
    """Facing the patient: the liver (patient's right, superior) is on the image left and higher."""
    img = read_png(render_views(meshes, tmp_path, colors=PURE)["anterior"])
    body = img[: int(0.85 * img.shape[0])]  # above the legend
    red, blue = where(body, 0), where(body, 2)
    assert len(red) > 500 and len(blue) > 500
    assert red[:, 1].mean() < blue[:, 1].mean()  # patient's right on the image left
    assert red[:, 0].mean() < blue[:, 0].mean()  # superior up
    # The ellipsoid is 2x taller (z) than wide (x): the picture keeps physical proportions.
    height, width = np.ptp(blue, axis=0)
    assert height / width == pytest.approx(2.0, rel=0.15)


def test_overlay_views_radiological(synthetic, tmp_path):
    path = overlay_views(synthetic.image, synthetic.label, SYNTH_LABELS, tmp_path / "overlay.png", colors=PURE)
    img = read_png(path)
    assert img.shape[:2] == (int(OVERLAY_SIZE_IN[1] * _DPI), int(OVERLAY_SIZE_IN[0] * _DPI))
    assert img.std() > 0.05
    # Axial panel (left third): patient's right (liver) on the image left, anterior (liver) up.
    axial = img[:, : int(0.3 * img.shape[1])]
    red, blue = where(axial, 0), where(axial, 2)
    assert len(red) > 100 and len(blue) > 100
    assert red[:, 1].mean() < blue[:, 1].mean()
    assert red[:, 0].mean() < blue[:, 0].mean()


def test_overlay_same_for_flipped_storage(synthetic, tmp_path):
    """The same volume stored with other axis directions must give the same picture."""
    reference = read_png(overlay_views(synthetic.image, synthetic.label, SYNTH_LABELS, tmp_path / "a.png"))
    for code in ("RAS", "LPI"):
        image = sitk.DICOMOrient(synthetic.image, code)
        label = sitk.DICOMOrient(synthetic.label, code)
        assert image.GetDirection() != synthetic.image.GetDirection()
        other = read_png(overlay_views(image, label, SYNTH_LABELS, tmp_path / f"{code}.png"))
        assert other.shape == reference.shape
        assert np.abs(other - reference).mean() < 1e-3, code


def test_organ_colors():
    assert organ_color("liver") == ORGAN_COLORS["liver"]
    assert organ_color("kidney_left") == ORGAN_COLORS["kidney_left"]
    assert organ_color("portal_vein_and_splenic_vein") == ORGAN_COLORS["portal_vein"]
    assert organ_color("liver", {"liver": (255, 0, 0)}) == (1.0, 0.0, 0.0)
    unknown = organ_color("some_new_structure")
    assert unknown == organ_color("some_new_structure") and len(unknown) == 3


@pytest.mark.shared_data
def test_totalseg_renders_fast(totalseg, tmp_path):
    labels = json.loads((totalseg / "labels.json").read_text())["labels"]
    label = sitk.ReadImage(str(totalseg / "example_seg.nii.gz"))
    image = sitk.ReadImage(str(totalseg / "example_ct_sm.nii.gz"))
    organs = {k: labels[k] for k in ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas",
                                      "aorta")}
    meshes = organ_meshes(label, organs)
    start = time.perf_counter()
    paths = render_views(meshes, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    img = read_png(paths["anterior"])
    assert img.std() > 0.05
    overlay = read_png(overlay_views(image, label, labels, tmp_path / "overlay.png"))
    assert overlay.std() > 0.05


def test_render_views_without_organs(tmp_path):
    """An empty prediction still gives the pictures (saying so) instead of stopping a pipeline."""
    paths = render_views({}, tmp_path)
    assert all(p.exists() for p in paths.values())
