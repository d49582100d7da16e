"""The segmentation network: a MONAI 3D U-Net, sized by configuration."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from fadal.config import TrainConfig


_NORMS = {"instance": "instance", "instance-affine": ("instance", {"affine": True}), "batch": "batch"}


def build_network(num_classes: int, cfg: TrainConfig | None = None) -> torch.nn.Module:
    """3D U-Net with instance normalisation (``cfg.norm``).

    Instance norm keeps no running statistics, so nothing scanner-specific is averaged across sites
    by federated aggregation (batch-norm statistics from different scanners do not mix well).
    ``instance-affine`` adds a learned per-channel scale/shift: FedBN keeps those at each site.
    """
    cfg = cfg or TrainConfig()
    channels = tuple(cfg.channels)
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_classes,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm=_NORMS[cfg.norm],
    )


def norm_state_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the normalisation layers (parameters and running statistics), in order."""
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    prefixes = [name + "." for name, mod in model.named_modules() if isinstance(mod, norm_types)]
    return [k for k in model.state_dict() if any(k.startswith(p) and "." not in k[len(p):] for p in prefixes)]


def pick_device() -> torch.device:
    """CUDA when present (users train on GPUs), the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_arrays(model: torch.nn.Module) -> list:
    """Model parameters as numpy arrays in state-dict order (what crosses the wire in federation)."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def load_state_arrays(model: torch.nn.Module, arrays: list) -> None:
    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise ValueError(f"model has {len(keys)} tensors, received {len(arrays)}: model/label-set mismatch?")
    model.load_state_dict({k: torch.as_tensor(a) for k, a in zip(keys, arrays)}, strict=True)
