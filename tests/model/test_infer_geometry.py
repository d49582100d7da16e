"""Predictions come back on the input's exact grid and line up with it in world coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fadal_testing import make_volume
from fadal.records import Plan, PreprocessConfig
from fadal.data.io import read_image, same_geometry, write_image
from fadal.errors import FadalInputError
from fadal.model.infer import predict_image


def plan_with(pre: PreprocessConfig, patch=(64, 64, 64)) -> Plan:
    return Plan(preprocess=pre, patch_size=patch)


class BrightIsOrgan(torch.nn.Module):
    """A real (parameter-free) segmenter: class 1 where the windowed intensity is high.

    Any flip, transpose or shift between network space and input space would move its output
    away from the input's bright organ, so it exposes geometry bugs without training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        organ = (x > 0.63).float()  # > ~115 HU: organ B (150 HU), not organ A (80 HU)
        return torch.cat([(1 - organ) * 10, organ * 10], dim=1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),            # LPS-aligned
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),          # RAS-stored
    (1, 0, 0, 0, 0, 1, 0, -1, 0),           # axes permuted (coronal-like acquisition)
])
def test_prediction_lines_up_with_input(tmp_path, direction):
    img, seg = make_volume(shape=(40, 36, 20), spacing=(1.5, 1.7, 3.5), origin=(-30.0, 12.0, 100.0),
                           direction=direction)
    truth = sitk.GetArrayFromImage(seg) == 2  # organ B is the bright one (150 HU)
    write_image(img, tmp_path / "ct.nii.gz")
    image = read_image(tmp_path / "ct.nii.gz")
    pre = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), hu_window=(-200.0, 300.0))
    label, conf = predict_image(BrightIsOrgan(), image, plan_with(pre), torch.device("cpu"))
    write_image(label, tmp_path / "pred.nii.gz")
    back = read_image(tmp_path / "pred.nii.gz")
    assert same_geometry(back, image) is None
    assert same_geometry(conf, image) is None
    pred = sitk.GetArrayFromImage(back) == 1
    assert _dice(pred, truth) > 0.85
    # World-coordinate centroids agree to well under a voxel.
    def centroid(mask, ref):
        idx = np.argwhere(mask)[:, ::-1].mean(0)  # (x, y, z) index
        return np.array(ref.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    assert np.linalg.norm(centroid(pred, back) - centroid(truth, img)) < 1.0


def test_real_ct_prediction_geometry(shared_data, tmp_path):
    """Real CT with RAS direction (TotalSegmentator example) and LPI (OpenKBP): grid preserved."""
    for path in (shared_data / "totalseg_example" / "example_ct_sm.nii.gz",
                 shared_data / "openkbp" / "imagesTr" / "kbp_001_0000.nii.gz"):
        image = read_image(path)
        hu = sitk.GetArrayViewFromImage(image)
        assert hu.min() < -500 and hu.max() > 300  # real HU range
        label, _ = predict_image(BrightIsOrgan(), image, plan_with(PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0))),
                                 torch.device("cpu"))
        assert same_geometry(label, image) is None
        # Bone (> ~250 HU after the 300 HU window top) must be where the network marked it.
        bone = sitk.GetArrayViewFromImage(image) > 400
        pred = sitk.GetArrayViewFromImage(label) == 1
        assert pred[bone].mean() > 0.7


class ShapeRecorder(BrightIsOrgan):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[2:]))
        return super().forward(x)


def test_a_volume_smaller_than_the_patch_takes_one_pass_and_tiles_give_the_same_answer():
    """Sliding windows of the plan's patch size: a small volume is padded to one patch, a larger one is
    tiled with Gaussian-weighted overlaps; for a network without context both give the same labels."""
    img, _ = make_volume(shape=(40, 36, 20), spacing=(1.5, 1.7, 3.5))
    pre = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), hu_window=(-200.0, 300.0))
    whole, tiled = ShapeRecorder(), ShapeRecorder()
    a, _ = predict_image(whole, img, plan_with(pre, (48, 48, 48)), torch.device("cpu"))
    b, _ = predict_image(tiled, img, plan_with(pre, (16, 16, 16)), torch.device("cpu"))
    assert whole.shapes == [(48, 48, 48)]  # 30x31x35 voxels at 2 mm, padded to the patch
    assert len(tiled.shapes) > 8 and set(tiled.shapes) == {(16, 16, 16)}
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def test_network_sees_only_the_body_and_the_prediction_comes_back_on_the_full_grid():
    """crop_to_body: a small body in a wide field of air reaches the network cropped to its box (plus a
    margin); the prediction is the same as without the crop, on the input's full grid, and the air
    outside the crop is background with full confidence."""
    small, seg = make_volume(shape=(20, 18, 12), spacing=(2.0, 2.0, 3.0))
    # The same body in the corner of a 3x wider field of view of air.
    hu = np.full((36, 60, 60), -1000, np.int16)  # (z, y, x)
    hu[2:14, 5:23, 3:23] = sitk.GetArrayFromImage(small)
    big = sitk.GetImageFromArray(hu)
    big.SetSpacing((2.0, 2.0, 3.0))
    truth = np.zeros(hu.shape, bool)
    truth[2:14, 5:23, 3:23] = sitk.GetArrayFromImage(seg) == 2
    shapes = {}
    for crop in (False, True):
        net = ShapeRecorder()
        pre = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), hu_window=(-200.0, 300.0), crop_to_body=crop)
        label, conf = predict_image(net, big, plan_with(pre, (16, 16, 16)), torch.device("cpu"))
        assert same_geometry(label, big) is None and same_geometry(conf, big) is None
        pred = sitk.GetArrayFromImage(label) == 1
        assert _dice(pred, truth) > 0.85
        shapes[crop] = len(net.shapes)  # 16^3 windows the network had to see
        if crop:
            c = sitk.GetArrayFromImage(conf)
            assert not pred[30:, 40:, 40:].any() and np.allclose(c[30:, 40:, 40:], 1.0)  # air far from the body
    assert shapes[True] * 4 < shapes[False]


def test_an_all_air_volume_is_not_cropped_to_nothing():
    air = sitk.GetImageFromArray(np.full((10, 12, 14), -1000, np.int16))
    label, conf = predict_image(BrightIsOrgan(), air, plan_with(PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0))),
                                torch.device("cpu"))
    assert same_geometry(label, air) is None and not sitk.GetArrayViewFromImage(label).any()


def test_a_checkpoint_carries_its_plan_and_anything_else_is_refused_with_the_file_named(tmp_path):
    from fadal.config import TrainConfig
    from fadal.records import NetworkConfig
    from fadal.model.infer import load_checkpoint, save_checkpoint
    from fadal.model.net import build_network

    plan = Plan(preprocess=PreprocessConfig(spacing_mm=(3.0, 3.0, 2.5), crop_to_body=False),
                network=NetworkConfig(channels=(4, 8)), patch_size=(32, 16, 48))
    model = build_network(3, plan.network)
    path = save_checkpoint(model, tmp_path / "new.pt", {"background": 0, "a": 1, "b": 2}, plan, TrainConfig())
    loaded, labels, back, _ = load_checkpoint(path)
    assert back == plan and labels == {"background": 0, "a": 1, "b": 2}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(FadalInputError, match="notes.pt: not a FADAL model checkpoint"):
        load_checkpoint(tmp_path / "notes.pt")
    old = torch.load(path, weights_only=True)
    old["format"] = 1
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(FadalInputError, match="old.pt: checkpoint format 1"):
        load_checkpoint(tmp_path / "old.pt")


class SixClasses(torch.nn.Module):
    """Logits of six classes: background, a bright organ, a left-right ramp, and three classes that never
    come near winning (one of them at up to ~8 %, under 1/K)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-3, 3, x.shape[2]).view(1, 1, -1, 1, 1).expand_as(x)
        organ = (x - 0.6) * 20
        base = torch.zeros_like(x)
        return torch.cat([base, organ, ramp, base - 2.5, base - 8, base - 12], dim=1)


def test_resampling_only_the_classes_that_can_win_gives_the_same_labels_and_confidence():
    """The reference resamples every class back (what predict_image did before the class subset)."""
    from monai.transforms import Invertd
    from monai.data import MetaTensor

    from fadal.data.preprocess import inference_transforms, to_metatensor
    from fadal.model.infer import classes_that_can_win, network_logits

    small, _ = make_volume(shape=(20, 18, 12), spacing=(1.3, 1.1, 3.0))
    hu = np.full((18, 40, 44), -1000, np.int16)  # the body in a wider field of air: the crop's fill matters
    hu[3:15, 10:28, 12:32] = sitk.GetArrayFromImage(small)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.3, 1.1, 3.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    plan = plan_with(PreprocessConfig(spacing_mm=(2.5, 2.5, 2.5), hu_window=(-200.0, 300.0)), (16, 16, 16))
    label, conf = predict_image(SixClasses(), image, plan, torch.device("cpu"))

    transforms = inference_transforms(plan.preprocess)
    data = transforms({"image": to_metatensor(image)})
    prob = torch.softmax(network_logits(SixClasses(), data["image"].as_tensor()[None], plan, torch.device("cpu")), 1)[0]
    assert classes_that_can_win(prob) == [0, 1, 2]  # class 3 peaks at ~0.08 < 1/6
    data["pred"] = MetaTensor(prob, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    back = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False)(data)["pred"].numpy()
    back[0] += np.clip(1.0 - back.sum(0), 0.0, 1.0)
    want = back.argmax(0)
    got = sitk.GetArrayFromImage(label).transpose(2, 1, 0)  # (x, y, z) as MONAI holds it
    assert {0, 1, 2} <= set(np.unique(want).tolist())
    assert np.array_equal(got, want)
    np.testing.assert_allclose(sitk.GetArrayFromImage(conf).transpose(2, 1, 0), back.max(0), atol=1e-5)
