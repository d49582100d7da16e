"""Fingerprint + compute budget -> :class:`~fadal.config.Plan` (the idea behind nnU-Net's planner).

The rules, in order:

1. **Spacing**: the median spacing per axis; when one axis is over 3x coarser than the finest
   (anisotropic scans), that axis takes its 10th percentile instead, as nnU-Net does, so that thin
   slices are not thrown away by the few thick-slice scans.
2. **Network**: on a CPU a MONAI UNet (strided first convolution: no full-resolution layer), on a GPU
   the nnU-Net architecture (DynUNet, deep supervision); five levels unless the patch is too small.
3. **Patch**: the median body extent at that spacing (rounded up to what the network divides), shrunk
   along its longest side until a step of ``batch_size`` patches fits the budget ``min_steps`` times
   (:data:`CPU_SECONDS_PER_VOXEL`, measured on 2 cores); never larger than ``max_patch_side``.
4. **CT normalisation**: the HU window is [p0.5, p99.5] of the drawn organs' voxels, mapped to [0, 1].
5. **Mirroring**: only when asked, with the label pairs whose names differ only by left/right.
"""

from __future__ import annotations

import math
import re

import numpy as np

from fadal.config import PlannerConfig
from fadal.records import NetworkConfig, Plan, PreprocessConfig
from fadal.records import Fingerprint

#: Seconds per voxel of one training sample (patch drawing, forward, partial-label loss, backward, AdamW)
#: for the default CPU network (UNet 16..256, 2 residual units, 8 classes), measured on 2 cores with the
#: engine itself: 2.29 s a step of 2 x 96x64x96, 3.51 s of 2 x 96x80x112.
CPU_SECONDS_PER_VOXEL = 2.0e-6
#: Voxels of one patch that the default GPU network trains in comfortably (nnU-Net's 3d_fullres scale).
GPU_PATCH_VOXELS = 128 ** 3
ANISOTROPY_RATIO = 3.0
MIN_PATCH_SIDE = 32


def target_spacing(fp: Fingerprint) -> tuple[float, float, float]:
    median = np.asarray(fp.spacing_mm.p50, dtype=float)
    spacing = median.copy()
    if median.max() / median.min() > ANISOTROPY_RATIO:
        coarse = int(np.argmax(median))
        spacing[coarse] = fp.spacing_mm.p10[coarse]
    return tuple(round(float(s), 3) for s in spacing)


def _round_up(value: float, k: int) -> int:
    return max(k, int(math.ceil(value / k)) * k)


def patch_size(extent_voxels: np.ndarray, divisor: int, max_voxels: float, max_side: int) -> tuple[int, int, int]:
    """Median body extent rounded up to ``divisor``, shrunk along its longest side until it fits ``max_voxels``."""
    floor = _round_up(MIN_PATCH_SIDE, divisor)
    patch = [min(_round_up(e, divisor), _round_up(max_side - divisor + 1, divisor)) for e in extent_voxels]
    patch = [max(p, floor) for p in patch]
    while np.prod(patch) > max_voxels and max(patch) > floor:
        i = int(np.argmax(patch))
        patch[i] -= divisor
    return tuple(int(p) for p in patch)


def mirror_pairs(labels: dict[str, int]) -> list[tuple[int, int]]:
    """Label pairs whose names differ only by left/right ('LeftParotid'/'RightParotid', 'kidney_left'/'kidney_right')."""
    pairs = []
    for name, value in labels.items():
        other = re.sub(r"(?i)left", lambda m: {"left": "right", "Left": "Right", "LEFT": "RIGHT"}.get(m.group(0), "right"), name)
        if other != name and other in labels:
            pairs.append((value, labels[other]))
    return sorted(pairs)


def resolve_device(cfg: PlannerConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_plan(fp: Fingerprint, labels: dict[str, int], cfg: PlannerConfig | None = None) -> Plan:
    cfg = cfg or PlannerConfig()
    device = resolve_device(cfg)
    notes: list[str] = []
    spacing = cfg.spacing_mm or target_spacing(fp)
    notes.append(f"spacing {spacing} mm: {'given' if cfg.spacing_mm else 'median of the scans (anisotropy-aware)'}")
    architecture = cfg.architecture or ("dynunet" if device == "cuda" else "unet")
    default_channels = (32, 64, 128, 256, 320) if architecture == "dynunet" else (16, 32, 64, 128, 256)
    extent = np.asarray(fp.body_extent_mm.p50, dtype=float) / np.asarray(spacing)
    channels = tuple(cfg.channels or default_channels)
    # Fewer levels when the median body is small: the bottleneck keeps at least 4 voxels a side.
    while len(channels) > 2 and min(extent) / 2 ** (len(channels) - 1) < 4 and not cfg.channels:
        channels = channels[:-1]
    network = NetworkConfig(architecture=architecture, channels=channels)
    if cfg.patch_size is not None:
        patch = tuple(cfg.patch_size)
        notes.append(f"patch {patch}: given")
    else:
        if device == "cuda":
            max_voxels = float(GPU_PATCH_VOXELS)
            why = f"at most {GPU_PATCH_VOXELS} voxels (GPU)"
        else:
            seconds = cfg.budget_minutes * 60.0
            max_voxels = seconds / (cfg.min_steps * cfg.batch_size * CPU_SECONDS_PER_VOXEL)
            why = (f"at most {max_voxels / 1e3:.0f} k voxels so that {cfg.budget_minutes:g} CPU minutes hold "
                   f"{cfg.min_steps} steps of {cfg.batch_size}")
        patch = patch_size(extent, network.divisor, max_voxels, cfg.max_patch_side)
        notes.append(f"patch {patch}: median body extent {tuple(round(float(e)) for e in extent)} voxels, {why}")
    hu = (-200.0, 300.0)
    if fp.foreground_hu is not None:
        hu = (round(fp.foreground_hu.p00_5, 1), round(fp.foreground_hu.p99_5, 1))
        if hu[1] - hu[0] < 1.0:
            hu = (hu[0] - 50.0, hu[1] + 50.0)
        notes.append(f"HU window {hu}: p0.5-p99.5 of the drawn organs' voxels")
    pairs = mirror_pairs(labels) if cfg.mirror else []
    pre = PreprocessConfig(spacing_mm=tuple(float(s) for s in spacing), hu_window=hu, crop_to_body=cfg.crop_to_body)
    return Plan(preprocess=pre, network=network, patch_size=patch, batch_size=cfg.batch_size, mirror_pairs=pairs,
                fingerprint=fp, notes=notes)


def plan_for_sites(sites, cfg: PlannerConfig | None = None) -> Plan:
    """Plan from the merged fingerprints of ``sites`` (:class:`fadal.data.site.Site`, all with one label set)."""
    from fadal.plan.fingerprint import merge_fingerprints, site_fingerprint

    cfg = cfg or PlannerConfig()
    prints = [site_fingerprint(s) for s in sites]
    return make_plan(merge_fingerprints(prints), sites[0].labels, cfg)
