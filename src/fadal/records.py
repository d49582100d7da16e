"""Typed records that stages hand each other (written by one stage, read by the next).

Each top-level record carries a ``schema_version``; a reader gets exactly what the writer wrote,
validated, never a dictionary read with ``.get(..., default)``. The :class:`Plan` (with its
:class:`PreprocessConfig` and :class:`NetworkConfig`) goes from the planner to training, into every
checkpoint and to inference; a site's :class:`Fingerprint` goes from the site to the planner.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Percentiles(_Record):
    """p10 / p50 / p90 of a quantity, one value per world axis (x, y, z of the canonical orientation)."""

    p10: tuple[float, float, float]
    p50: tuple[float, float, float]
    p90: tuple[float, float, float]


class IntensityStats(_Record):
    """HU statistics of the voxels inside drawn organs (nnU-Net's CT normalisation uses these)."""

    p00_5: float
    p50: float
    p99_5: float
    mean: float
    std: float


class Fingerprint(_Record):
    """What a site says about its data to plan the network: aggregate statistics only.

    No per-case value is in it (no case ids, no per-case spacing list, no per-case volume): spacing
    and body extent as percentiles over the site's scans, HU as percentiles over voxels pooled from
    every labeled scan, organ volumes as a range. In a federation each site sends its own and the
    coordinator merges them (:func:`fadal.plan.fingerprint.merge_fingerprints`), as FednnU-Net does.
    """

    schema_version: int = 1
    sites: int = Field(1, ge=1, description="How many site fingerprints were merged into this one.")
    scans: int = Field(ge=1, description="Scans measured (labeled and unlabeled).")
    labeled_scans: int = Field(ge=0)
    spacing_mm: Percentiles
    body_extent_mm: Percentiles = Field(description="Extent of the body's bounding box (voxels above the body "
                                        "threshold), per axis, in mm.")
    foreground_hu: IntensityStats | None = Field(None, description="None when no scan is labeled.")
    organ_volume_ml: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Organ -> (smallest, largest) volume over the scans that drew it (ml).")


class PreprocessConfig(_Record):
    """How every CT is brought to the network's space (MONAI transforms, see data/preprocess.py)."""

    spacing_mm: tuple[float, float, float] = Field((4.0, 4.0, 4.0), description="Target voxel spacing (mm).")
    hu_window: tuple[float, float] = Field((-200.0, 300.0), description="HU range mapped to [0, 1] (abdominal soft tissue).")
    orientation: str = Field("RAS", description="Canonical axis codes the network sees.")
    crop_to_body: bool = Field(True, description="Crop every volume to the bounding box of its voxels above "
                               "body_threshold_hu (plus a margin) before resampling; the prediction is padded back "
                               "(background) onto the input grid. Most of a CT's field of view can be air (an OpenKBP "
                               "head-and-neck scan's body box is 14-43 % of its volume): the network need not see it.")
    body_threshold_hu: float = Field(-500.0, description="HU above which a voxel counts as body (or table) for "
                                     "crop_to_body.")


class NetworkConfig(_Record):
    """The segmentation network (MONAI). Part of the :class:`Plan`: it travels with every checkpoint."""

    architecture: Literal["unet", "dynunet"] = Field(
        "unet", description="'unet': MONAI UNet with residual units; its first convolution is strided, so no layer "
        "works at full resolution (measured on 2 CPU cores, 2 x 96x64x96 patches: 1.8 s a step for 16..256 channels "
        "against 17 s for a DynUNet 16..256, whose two full-resolution convolutions dominate). 'dynunet': the nnU-Net "
        "architecture (MONAI DynUNet) with deep supervision, the planner's choice on a GPU.")
    channels: tuple[int, ...] = Field((16, 32, 64, 128, 256), description="Feature channels per level (the number of "
                                      "levels is the network's depth: patches are multiples of 2**(levels-1)).")
    res_units: int = Field(2, ge=0, description="'unet': residual units per level.")
    deep_supervision: int = Field(2, ge=0, description="'dynunet': extra outputs at coarser decoder levels whose loss "
                                  "is added with weights 1/2, 1/4, ... (0 = off).")
    norm: Literal["instance", "instance-affine", "batch"] = Field(
        "instance",
        description="Normalisation layers: 'instance' (no learned parameters; nothing scanner-specific is averaged "
        "across sites), 'instance-affine' (per-channel learned scale/shift; what strategy 'fedbn' keeps at each "
        "site) or 'batch'.",
    )

    @property
    def divisor(self) -> int:
        """Every patch side must be a multiple of this (the network halves it levels-1 times)."""
        return 2 ** (len(self.channels) - 1)


class Plan(_Record):
    """Everything that fixes how data reach the network and what the network is: made by the planner from
    the sites' fingerprints (``fadal plan``), stored in every checkpoint, used by training and inference.
    Editable like nnU-Net's plans: a hand-edited plan is validated the same way."""

    schema_version: int = 1
    preprocess: PreprocessConfig = PreprocessConfig()
    network: NetworkConfig = NetworkConfig()
    patch_size: tuple[int, int, int] = Field((96, 96, 96), description="Training patch and sliding-window size "
                                             "(voxels of preprocess.spacing_mm, canonical x, y, z).")
    batch_size: int = Field(2, ge=1, description="Patches per optimiser step.")
    mirror_pairs: list[tuple[int, int]] = Field(
        default_factory=list, description="Label values swapped when a patch is mirrored left/right (e.g. left and "
        "right parotid). Empty: no mirroring (an abdomen's liver and spleen have no mirror image).")
    fingerprint: Fingerprint | None = Field(None, description="The (merged) fingerprint the plan was made from.")
    notes: list[str] = Field(default_factory=list, description="Why the planner chose what it chose.")

    @model_validator(mode="after")
    def _patch_fits_network(self) -> "Plan":
        k = self.network.divisor
        if any(p % k for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be multiples of {k} for a network of "
                             f"{len(self.network.channels)} levels")
        return self
