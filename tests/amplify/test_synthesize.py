"""Synthesis of labeled pairs from learned transforms, on phantoms with known anatomy (real elastix runs)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fadal.amplify.geometry import grid_world_points
from fadal.amplify.synthesize import SyntheticPairs, build_synthesizer, prepare, sample_volume, synthesize, world_to_grid
from fadal.config import SynthesisConfig
from fadal.records import PreprocessConfig

pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # SWIG, on importing itk

PRE = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), hu_window=(-200.0, 300.0))
ORGANS = (1, 2, 3)
HU_OFFSET = 40.0  # target u2's "scanner" reads 40 HU higher: what the appearance field should pick up


def _write(tmp_path, phantom):
    scans = {
        "atlas": phantom(44, 4.5, shift_mm=(6.0, -4.0, 3.0), warp_mm=4.0, flip=True, seed=2),
        "u1": phantom(48, 4.0, seed=1),
        "u2": phantom(46, 4.2, shift_mm=(-5.0, 3.0, -4.0), warp_mm=6.0, seed=3),
    }
    paths = {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, (img, lab) in scans.items():
        if name == "u2":
            img = sitk.Cast(img, sitk.sitkFloat32) + HU_OFFSET
        paths[name] = (tmp_path / f"{name}_0000.nii.gz", tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(img, str(paths[name][0]))
        sitk.WriteImage(lab, str(paths[name][1]))
    return paths


def _build(tmp_path, phantom, fast_cfg, length=4, cache=None, **kw):
    paths = _write(tmp_path, phantom)
    cfg = SynthesisConfig(registration=fast_cfg(), **kw)
    pairs = build_synthesizer([("atlas", *paths["atlas"], list(ORGANS))], [("u1", paths["u1"][0]), ("u2", paths["u2"][0])],
                              PRE, cfg, num_classes=4, length=length, cache_dir=cache or tmp_path / "cache")
    return pairs, paths


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_synthetic_labels_are_deformed_not_destroyed(tmp_path, phantom, fast_cfg, one_itk_thread):
    pairs, paths = _build(tmp_path, phantom, fast_cfg, appearance="none")
    atlas = pairs.atlases[0]
    assert len(pairs.transforms[0]) == 2 and all(t.ncc_after > t.ncc_before for t in pairs.transforms[0])
    for t in pairs.transforms[0]:
        _, label = synthesize(atlas, t)
        target = prepare(t.target, paths[t.target][0], PRE, paths[t.target][1])
        assert tuple(label.shape) == tuple(target.image.shape)  # the pair lives on the target's grid
        # The atlas label without deformation, on the same grid through world coordinates.
        identity = world_to_grid(torch.as_tensor(grid_world_points(label.shape, t.target_affine)), atlas.affine,
                                 atlas.image.shape)
        undeformed = sample_volume(atlas.label.float(), identity, mode="nearest").numpy()
        syn, ref = label.numpy(), target.label.numpy()
        for c in ORGANS:
            vol_ratio = (syn == c).sum() / (atlas.label.numpy() == c).sum()  # same 4 mm voxels
            assert 0.7 <= vol_ratio <= 1.3, (t.target, c, vol_ratio)
            assert _dice(syn == c, undeformed == c) <= 0.99, (t.target, c)  # really deformed
            assert _dice(syn == c, ref == c) > 0.75, (t.target, c)  # ... into the target's real anatomy
            assert _dice(syn == c, ref == c) > _dice(undeformed == c, ref == c) + 0.05
        # Not destroyed: the large organs overlap their undeformed selves as much as the target's real
        # organs do -- the deformation moves them as far as the anatomy differs, not further. (The
        # 20 mm thick spine moves by about its radius between these phantoms, so its overlap is low by
        # construction; its volume and its overlap with the target above show it intact.)
        for c in (1, 2):
            assert abs(_dice(syn == c, undeformed == c) - _dice(ref == c, undeformed == c)) < 0.1, (t.target, c)
            assert 0.4 <= _dice(syn == c, undeformed == c), (t.target, c)


def test_image_and_label_stay_aligned_and_appearance_is_learned(tmp_path, phantom, fast_cfg, one_itk_thread):
    from scipy.ndimage import binary_erosion

    pairs, _ = _build(tmp_path, phantom, fast_cfg)
    atlas = pairs.atlases[0]
    fields = {t.target: t.appearance.float() for t in pairs.transforms[0]}
    body = atlas.image > 0.2
    # u2 reads 40 HU (0.08 of the 500 HU window) higher than the atlas, u1 the same. (Less than 0.08
    # comes back where the window clips: the spine is above 300 HU in both.)
    assert 0.04 < float(fields["u2"][body].median()) < 0.1
    assert abs(float(fields["u1"][body].median())) < 0.02
    interior = {c: torch.as_tensor(binary_erosion((atlas.label == c).numpy())) for c in ORGANS}
    for _ in range(6):
        item = pairs.sample()
        _, spatial, app, scale = item["synthetic"]
        image, label = item["image"][0], item["label"][0]
        shifted = (atlas.image + scale * fields[app]).clamp(0, 1)
        expected = {c: float(shifted[interior[c]].mean()) for c in ORGANS}
        for c in ORGANS:
            # Inside each synthetic organ (away from its partial-volume rim) the synthetic image shows
            # that organ's atlas intensity (+ the drawn appearance change), not a neighbour's.
            m = float(image[torch.as_tensor(binary_erosion((label == c).numpy()))].mean())
            assert abs(m - expected[c]) < 0.04, (item["synthetic"], c, m, expected[c])
            for other in ORGANS:
                if other != c:
                    assert abs(m - expected[c]) < abs(m - expected[other])


def test_sampler_draws_differ_and_transforms_are_cached(tmp_path, phantom, fast_cfg, one_itk_thread):
    pairs, _ = _build(tmp_path, phantom, fast_cfg, length=5)
    assert len(pairs) == 5 and pairs.summary()["combinations"] == 4
    draws = [pairs.sample() for _ in range(8)]
    assert len({d["synthetic"] for d in draws}) > 1
    assert len({d["synthetic"][1] for d in draws}) == 2  # both spatial transforms get used
    assert any(not torch.equal(draws[0]["image"], d["image"]) for d in draws[1:])
    item = pairs[0]
    assert set(item) == {"image", "label", "confidence", "known", "version"}
    assert item["image"].shape == item["label"].shape == item["confidence"].shape and item["image"].ndim == 4
    assert item["known"].tolist() == [True, True, True, True]
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert set(np.unique(item["label"].numpy())) <= {0, 1, 2, 3}
    # Same scans and settings: learned again from the site's cache, not registered.
    again, _ = _build(tmp_path / "again", phantom, fast_cfg, cache=tmp_path / "cache")
    assert all(t.cached for t in again.transforms[0])
    assert torch.equal(again.transforms[0][0].grid, pairs.transforms[0][0].grid)


def test_sampler_without_usable_transform_is_an_error():
    from fadal.errors import FadalInputError

    with pytest.raises(FadalInputError, match="no usable transform"):
        SyntheticPairs([], [], num_classes=2, length=1)


def test_a_transform_without_common_body_is_rejected_not_scored_on_the_whole_volume():
    """NCC in an empty body mask is NaN (geometry.ncc, as in register.py), and a NaN fails the thresholds."""
    from fadal.amplify.synthesize import LearnedTransform
    from fadal.config import RegistrationConfig

    cfg = RegistrationConfig(min_ncc=0.0, min_body_dice=0.0)
    t = LearnedTransform("t", torch.zeros(2, 2, 2, 3).half(), np.eye(4), None, float("nan"), float("nan"), 0.0, 0.0)
    assert "NCC nan" in t.failure(cfg)
    assert LearnedTransform(**{**t.__dict__, "ncc_after": 0.5}).failure(cfg) is None
