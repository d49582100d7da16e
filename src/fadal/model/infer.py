"""Gaussian-weighted sliding-window inference at the plan's patch size, and the way back to the input's
exact voxel grid; checkpoints that carry their plan."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd
from pydantic import ValidationError

from fadal.config import TrainConfig
from fadal.records import Plan
from fadal.data.io import save_torch
from fadal.data.preprocess import from_array, inference_transforms, to_metatensor
from fadal.errors import FadalInputError
from fadal.model.net import build_network

#: Checkpoint format; a checkpoint of another version is refused (nothing has been released).
CHECKPOINT_VERSION = 2


def network_logits(model: torch.nn.Module, x: torch.Tensor, plan: Plan, device: torch.device, amp: bool = True,
                   overlap: float = 0.5) -> torch.Tensor:
    """Logits for a preprocessed (1, 1, X, Y, Z) volume: Gaussian-weighted windows of the patch size (a
    volume smaller than the patch is padded to it and takes one pass)."""
    model.to(device).eval()
    cuda_amp = amp and device.type == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.float16) if cuda_amp else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return sliding_window_inference(x.to(device), tuple(plan.patch_size), sw_batch_size=1, predictor=model,
                                        overlap=overlap, mode="gaussian")


def predict_image(model: torch.nn.Module, image: sitk.Image, plan: Plan, device: torch.device, amp: bool = True,
                  overlap: float = 0.5) -> tuple[sitk.Image, sitk.Image]:
    """Segment one CT. Returns (label map, confidence = max class probability), both on ``image``'s grid.

    Probabilities (not labels) are resampled back through MONAI's recorded inverse transforms, then
    argmax-ed on the input grid: boundaries stay smooth when the network works at a coarser spacing.
    Only the classes that can win somewhere go back (:func:`classes_that_can_win`), which gives the same
    labels and confidence as resampling all of them: a 42-class network on a 512 x 512 series would
    otherwise resample 42 full-resolution volumes for the two or three organs it found.
    """
    transforms = inference_transforms(plan.preprocess)
    data = transforms({"image": to_metatensor(image)})
    logits = network_logits(model, data["image"].as_tensor()[None], plan, device, amp, overlap)
    prob = torch.softmax(logits.float(), dim=1)[0].cpu()
    keep = classes_that_can_win(prob)
    # The last channel is 1 inside the network's (body-cropped) grid; after the inverse it says how much
    # of each input voxel lay inside it.
    sub = torch.cat([prob[keep], torch.ones_like(prob[:1])])
    data["pred"] = MetaTensor(sub, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    back = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False)(data)["pred"]
    back = back.as_tensor().numpy()
    inside, back = back[-1], back[:-1]
    # Outside the body crop the inverse fills every class with 0: that is background.
    back[0] += np.clip(1.0 - inside, 0.0, 1.0)
    label = np.asarray(keep, np.uint8)[back.argmax(0)]
    conf = back.max(0).astype(np.float32)
    return from_array(label, image), from_array(conf, image)


def classes_that_can_win(prob: torch.Tensor) -> list[int]:
    """Background and every class whose probability reaches 1/K somewhere (K classes, ``prob`` (K, ...)).

    Linear resampling makes each output voxel a convex combination of network voxels, so its class
    probabilities still sum to 1 and its winner has at least 1/K; a class below 1/K at every network
    voxel stays below it everywhere and can never win (nor be the confidence). A small margin covers
    float rounding."""
    k = prob.shape[0]
    peak = prob.reshape(k, -1).amax(1)
    return [0] + [c for c in range(1, k) if float(peak[c]) >= 1.0 / k - 1e-4]


def save_checkpoint(model: torch.nn.Module, path: Path, labels: dict[str, int], plan: Plan, train_cfg: TrainConfig,
                    extra: dict | None = None) -> Path:
    """A checkpoint carries what inference needs: weights, label names and the plan (network, preprocessing)."""
    return save_torch({"format": CHECKPOINT_VERSION, "state_dict": model.state_dict(), "labels": labels,
                       "plan": plan.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
                       **(extra or {})}, path)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents (tensors and plain data only), or a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FadalInputError(f"{path}: model checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle/zip/runtime errors of several kinds for a non-checkpoint
        raise FadalInputError(f"{path}: not a FADAL model checkpoint ({type(err).__name__}); give the model.pt "
                              "written by `fadal train`, `fadal federate` or `fadal amplify`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_VERSION:
        found = ckpt.get("format", "none") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise FadalInputError(f"{path}: checkpoint format {found}, this FADAL reads format {CHECKPOINT_VERSION}; "
                              "retrain with this version")
    return ckpt


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, int], Plan, dict]:
    ckpt = read_checkpoint(path)
    try:
        plan = Plan.model_validate(ckpt["plan"])
    except ValidationError as err:
        raise FadalInputError(f"{path}: the checkpoint's plan is invalid ({err.error_count()} errors)") from None
    labels = {k: int(v) for k, v in ckpt["labels"].items()}
    model = build_network(max(labels.values()) + 1, plan.network)
    model.load_state_dict(ckpt["state_dict"])
    return model, labels, plan, ckpt
