"""MONAI transform chains that bring a CT into the network's space, and back.

Volumes are read with SimpleITK (our checks, DICOM, atomic writes) and handed to MONAI as
``MetaTensor`` with a RAS affine; MONAI's own ``Orientation``/``Spacing`` transforms then do the work
and record themselves, so ``Invertd`` can bring a prediction back onto the input grid exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from fadal.records import PreprocessConfig
from fadal.data.io import read_image

#: LPS (ITK) <-> RAS (MONAI/NIfTI) flip of the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 voxel(x,y,z) -> RAS world affine of a SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def to_metatensor(image: sitk.Image, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """SimpleITK image -> channel-first MetaTensor (1, x, y, z) with its RAS affine."""
    arr = sitk.GetArrayFromImage(image)  # (z, y, x)
    tensor = torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 1, 0)), dtype=dtype)[None]
    return MetaTensor(tensor, affine=torch.as_tensor(sitk_affine_ras(image), dtype=torch.float64))


def from_array(arr_xyz: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Array on ``reference``'s voxel grid in (x, y, z) order -> image with reference's geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr_xyz).transpose(2, 1, 0)))
    out.CopyInformation(reference)
    return out


class LoadVolumesd(MapTransform):
    """Read image/label/confidence files through :func:`fadal.data.io.read_image` into MetaTensors.

    A missing ``confidence`` means the label is a real annotation: full confidence everywhere.
    """

    def __init__(self, keys=("image", "label", "confidence")) -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = read_image(d["image"])
        d["image"] = to_metatensor(image)
        if d.get("label") is not None:
            d["label"] = to_metatensor(read_image(d["label"]), torch.float32)
            conf = d.get("confidence")
            d["confidence"] = to_metatensor(read_image(conf)) if conf else torch.ones_like(d["label"])
        else:
            d.pop("label", None)
            d.pop("confidence", None)
        return d


#: Margin (input voxels) kept around the body's bounding box by ``crop_to_body``.
BODY_MARGIN_VOXELS = 4


class BodyMask:
    """``select_fn`` of the body crop: voxels above ``threshold_hu``; every voxel when none is (an
    all-air volume is cropped to nothing rather than to an empty box)."""

    def __init__(self, threshold_hu: float) -> None:
        self.threshold_hu = threshold_hu

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        mask = img > self.threshold_hu
        return mask if bool(mask.any()) else torch.ones_like(mask)


def spatial_transforms(cfg: PreprocessConfig, keys: tuple[str, ...]) -> list:
    """Orientation, body crop, spacing and intensity windowing (invertible: used by training and inference)."""
    modes = {"image": "bilinear", "label": "nearest", "confidence": "bilinear", "pred": "bilinear"}
    crop = []
    if cfg.crop_to_body:
        # Before resampling (cheaper); the recorded crop is undone by Invertd with zero padding.
        crop = [CropForegroundd(keys=list(keys), source_key="image", select_fn=BodyMask(cfg.body_threshold_hu),
                                margin=BODY_MARGIN_VOXELS, allow_smaller=True, start_coord_key=None, end_coord_key=None)]
    return [
        Orientationd(keys=list(keys), axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        *crop,
        Spacingd(keys=list(keys), pixdim=cfg.spacing_mm, mode=[modes[k] for k in keys]),
        ScaleIntensityRanged(keys="image", a_min=cfg.hu_window[0], a_max=cfg.hu_window[1], b_min=0.0, b_max=1.0, clip=True),
    ]


def training_transforms(cfg: PreprocessConfig) -> Compose:
    """The deterministic (cacheable) part for training items: whole volumes on the network's grid.

    Patches and their augmentation are drawn from these by :mod:`fadal.model.patches`; no padding
    here: a volume smaller than the patch is padded there (with confidence 0: no loss on padding)."""
    keys = ("image", "label", "confidence")
    return Compose([LoadVolumesd(keys), *spatial_transforms(cfg, keys)])


def inference_transforms(cfg: PreprocessConfig) -> Compose:
    return Compose(spatial_transforms(cfg, ("image",)))


def training_item(image: Path, label: Path, known: list[int], confidence: Path | None = None,
                  amplified: bool = False) -> dict:
    """One training example as the data loader expects it (paths only: data stays on disk); ``amplified``
    marks a pseudo-label (the sampler may draw it less often than a real annotation)."""
    return {"image": str(image), "label": str(label), "confidence": str(confidence) if confidence else None,
            "known": list(known), "amplified": amplified}
