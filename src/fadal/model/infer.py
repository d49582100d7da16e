"""Sliding-window inference and the way back to the input's exact voxel grid."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from fadal.config import PreprocessConfig, TrainConfig
from fadal.data.io import save_torch
from fadal.data.preprocess import from_array, inference_transforms, to_metatensor
from fadal.model.net import build_network


#: Volumes up to this many voxels (on the network's grid) go through the network in one pass. Training
#: sees whole volumes (no crops) and instance norm takes its statistics over what it sees, so one pass is
#: also what the network was trained on; and overlapping tiles cost far more: a 112x112x64 volume takes
#: 0.6 s in one pass vs 2.9 s as 96^3 tiles (1 CPU thread).
#: 160^3 keeps the largest activation of the default network (16 channels) near 260 MB.
WHOLE_VOLUME_VOXELS = 160 ** 3


def window_size(shape: tuple[int, ...], roi_size: tuple[int, int, int], whole_volume_voxels: int) -> tuple[int, ...]:
    """The sliding-window size: the whole (padded) volume when small enough, else ``roi_size``."""
    return tuple(shape) if int(np.prod(shape)) <= whole_volume_voxels else tuple(roi_size)


def predict_image(model: torch.nn.Module, image: sitk.Image, pre: PreprocessConfig, device: torch.device,
                  roi_size: tuple[int, int, int] = (96, 96, 96), amp: bool = True,
                  whole_volume_voxels: int = WHOLE_VOLUME_VOXELS) -> tuple[sitk.Image, sitk.Image]:
    """Segment one CT. Returns (label map, confidence = max class probability), both on ``image``'s grid.

    Probabilities (not labels) are resampled back through MONAI's recorded inverse transforms, then
    argmax-ed on the input grid: boundaries stay smooth when the network works at a coarser spacing.
    """
    transforms = inference_transforms(pre)
    data = transforms({"image": to_metatensor(image)})
    x = data["image"].as_tensor()[None].to(device)
    model.to(device).eval()
    ctx = torch.autocast("cuda", dtype=torch.float16) if (amp and device.type == "cuda") else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        roi = window_size(tuple(x.shape[2:]), roi_size, whole_volume_voxels)
        logits = sliding_window_inference(x, roi, sw_batch_size=1, predictor=model, overlap=0.25)
    prob = torch.softmax(logits.float(), dim=1)[0].cpu()
    data["pred"] = MetaTensor(prob, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    back = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False)(data)["pred"]
    back = back.as_tensor().numpy()
    # Outside the body crop (and the padding) the inverse fills every class with 0: that is background.
    back[0] += np.clip(1.0 - back.sum(0), 0.0, 1.0)
    label = back.argmax(0).astype(np.uint8)
    conf = back.max(0).astype(np.float32)
    return from_array(label, image), from_array(conf, image)


def save_checkpoint(model: torch.nn.Module, path: Path, labels: dict[str, int], train_cfg: TrainConfig,
                    pre: PreprocessConfig, extra: dict | None = None) -> Path:
    """A checkpoint carries what inference needs: weights, label names, network and preprocessing."""
    return save_torch({"state_dict": model.state_dict(), "labels": labels, "train": train_cfg.model_dump(mode="json"),
                       "preprocess": pre.model_dump(mode="json"), **(extra or {})}, path)


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, int], PreprocessConfig, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    train_cfg = TrainConfig.model_validate(ckpt["train"])
    labels = {k: int(v) for k, v in ckpt["labels"].items()}
    model = build_network(max(labels.values()) + 1, train_cfg)
    model.load_state_dict(ckpt["state_dict"])
    # A checkpoint from before the body crop existed was trained on whole fields of view: keep it so.
    pre = {"crop_to_body": False, **ckpt["preprocess"]}
    return model, labels, PreprocessConfig.model_validate(pre), ckpt
