"""The segmentation network (MONAI), built from the plan's :class:`~fadal.config.NetworkConfig`."""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet, UNet

from fadal.records import NetworkConfig


_NORMS = {"instance": "instance", "instance-affine": ("instance", {"affine": True}), "batch": "batch"}


def build_network(num_classes: int, cfg: NetworkConfig | None = None) -> torch.nn.Module:
    """UNet (CPU default) or DynUNet (nnU-Net's architecture, GPU default), normalised by ``cfg.norm``.

    Instance norm keeps no running statistics, so nothing scanner-specific is averaged across sites
    by federated aggregation (batch-norm statistics from different scanners do not mix well).
    ``instance-affine`` adds a learned per-channel scale/shift: FedBN keeps those at each site.
    In training mode a DynUNet with deep supervision returns (B, 1 + heads, C, ...), every head
    upsampled to the input size; in eval mode it returns the main output only.
    """
    cfg = cfg or NetworkConfig()
    channels = tuple(cfg.channels)
    levels = len(channels)
    if cfg.architecture == "dynunet":
        return DynUNet(
            spatial_dims=3, in_channels=1, out_channels=num_classes,
            kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1),
            filters=list(channels), norm_name=_NORMS[cfg.norm],
            deep_supervision=cfg.deep_supervision > 0, deep_supr_num=max(1, min(cfg.deep_supervision, levels - 2)),
            res_block=True,
        )
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_classes,
        channels=channels,
        strides=(2,) * (levels - 1),
        num_res_units=cfg.res_units,
        norm=_NORMS[cfg.norm],
    )


def parameter_count(num_classes: int, cfg: NetworkConfig) -> int:
    """Parameters of the network ``cfg`` describes, built on the meta device (no memory): a site can
    check a requested network's size before building it."""
    with torch.device("meta"):
        net = build_network(num_classes, cfg)
    return sum(p.numel() for p in net.parameters())


def norm_state_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the normalisation layers (parameters and running statistics), in order."""
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    prefixes = [name + "." for name, mod in model.named_modules() if isinstance(mod, norm_types)]
    return [k for k in model.state_dict() if any(k.startswith(p) and "." not in k[len(p):] for p in prefixes)]


def pick_device() -> torch.device:
    """CUDA when present (users train on GPUs), the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_summary() -> str:
    """The device training and inference run on, as one line for the user (CLI, demo)."""
    dev = pick_device()
    if dev.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(0)}), mixed precision"
    return f"CPU ({torch.get_num_threads()} threads)"
