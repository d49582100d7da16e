"""Small synthetic CT sites written on the fly, shared by the tests (imported as ``fadal_testing``:
several folders have their own conftest.py, so ``from conftest import`` would be ambiguous)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def make_volume(shape=(24, 20, 16), spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seed=0) -> tuple[sitk.Image, sitk.Image]:
    """A tiny CT-like body with two 'organs' (labels 1 and 2). shape is (x, y, z)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy, cz = [n / 2 for n in shape]
    body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.45 * shape[1])) ** 2 <= 1
    organ1 = ((x - cx * 0.7) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) <= (0.18 * min(shape)) ** 2 * 4
    organ2 = ((x - cx * 1.35) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) <= (0.12 * min(shape)) ** 2 * 4
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 5, shape)
    ct[organ1] = 80 + rng.normal(0, 5, organ1.sum())
    ct[organ2] = 150 + rng.normal(0, 5, organ2.sum())
    lab = np.zeros(shape, np.uint8)
    lab[organ1] = 1
    lab[organ2] = 2
    img = sitk.GetImageFromArray(ct.transpose(2, 1, 0).astype(np.int16))
    seg = sitk.GetImageFromArray(lab.transpose(2, 1, 0))
    for im in (img, seg):
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        im.SetDirection(direction)
    return img, seg


LABELS = {"background": 0, "organA": 1, "organB": 2}


def write_site(root: Path, n_labeled=2, n_unlabeled=1, n_test=1, cases_json: dict | None = None) -> Path:
    """A tiny nnU-Net v2 site folder."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "imagesTs").mkdir(exist_ok=True)
    (root / "labelsTs").mkdir(exist_ok=True)
    json.dump({"name": root.name, "channel_names": {"0": "CT"}, "labels": LABELS, "file_ending": ".nii.gz"},
              open(root / "dataset.json", "w"))
    k = 0
    for kind, n in (("labeled", n_labeled), ("unlabeled", n_unlabeled), ("test", n_test)):
        for _ in range(n):
            cid = f"case_{k:03d}"
            img, seg = make_volume(seed=k)
            folder = "Ts" if kind == "test" else "Tr"
            sitk.WriteImage(img, str(root / f"images{folder}" / f"{cid}_0000.nii.gz"))
            if kind != "unlabeled":
                sitk.WriteImage(seg, str(root / f"labels{folder}" / f"{cid}.nii.gz"))
            k += 1
    if cases_json is not None:
        json.dump(cases_json, open(root / "cases.json", "w"))
    return root


def tiny_plan(channels=(4, 8), spacing_mm: float = 8.0, patch=None, norm: str = "instance"):
    """A plan small enough for tests: a few channels, coarse spacing, a patch the network divides.

    The tiny sites above are about 48 x 40 x 48 mm: at 8 mm one 16^3 patch (padded) covers them."""
    from fadal.records import NetworkConfig, Plan, PreprocessConfig

    k = 2 ** (len(channels) - 1)
    patch = patch or (max(16, k),) * 3
    return Plan(preprocess=PreprocessConfig(spacing_mm=(spacing_mm,) * 3),
                network=NetworkConfig(channels=tuple(channels), res_units=1, norm=norm), patch_size=tuple(patch),
                batch_size=1)
