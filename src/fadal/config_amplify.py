"""Settings of amplification's building blocks that stand on their own: ConvexAdam registration, label
fusion and pseudo-label QC (validated like every config; :mod:`fadal.config` re-exports them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConvexAdamConfig(_Strict):
    """``registration.method: convexadam`` (PyPI ``convexadam``; see amplify/convexadam.py). Defaults are the
    package's own, on a grid of ``spacing_mm``."""

    spacing_mm: float = Field(3.0, gt=0, description="Isotropic grid both scans are resampled onto (mm).")
    grid_sp: int = Field(6, ge=1, description="Coarse search grid (voxels of the work grid).")
    disp_hw: int = Field(4, ge=1, description="Coarse search half-width, in steps of grid_sp voxels.")
    grid_sp_adam: int = Field(2, ge=1, description="Grid of the Adam instance optimisation (voxels).")
    iterations: int = Field(80, ge=0, description="Adam iterations (0: the coarse convex step only).")
    lambda_weight: float = Field(1.25, ge=0, description="Diffusion regularisation weight of the Adam stage.")
    mind_r: int = Field(1, ge=1, description="MIND-SSC patch radius.")
    mind_d: int = Field(2, ge=1, description="MIND-SSC neighbourhood distance.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when present.")


class FusionConfig(_Strict):
    """Multi-atlas label fusion (every method lets an atlas vote only on the organs it annotated)."""

    method: Literal["majority", "weighted", "staple", "joint"] = Field(
        "majority",
        description="'majority': strict majority of the atlases that drew the organ. 'weighted': locally weighted "
        "vote, weight exp(-local mean squared HU difference / (2 weight_sigma_hu^2)) between scan and warped atlas. "
        "'staple': binary STAPLE per organ over the atlases that drew it, argmax of the posteriors above 0.5. "
        "'joint': joint label fusion (Wang et al. 2013): local weights from the atlases' patch differences to "
        "the scan and how they co-occur, so atlases that err together do not outvote a right one.",
    )
    top_k: int | None = Field(None, ge=1, description="Fuse only the top_k registered atlases with the best NCC "
                              "to the scan (after failed registrations are excluded); None = all.")
    weight_sigma_hu: float = Field(30.0, gt=0, description="'weighted': HU difference scale of the weights "
                                   "(soft-tissue contrasts are 30-100 HU; at 100 the weights hardly differ).")
    weight_radius_mm: float = Field(4.0, gt=0, description="'weighted': Gaussian sigma (mm) of the local window.")
    joint_radius_mm: float = Field(5.0, gt=0, description="'joint': patch radius (mm; at least one voxel).")
    joint_sigma_hu: float = Field(30.0, gt=0, description="'joint': HU scale of the patch differences.")
    joint_alpha: float = Field(0.1, gt=0, description="'joint': added to the diagonal of the error-correlation "
                               "matrix (conditioning; Wang et al.'s alpha).")
    joint_beta: float = Field(2.0, gt=0, description="'joint': power on the patch error products (Wang et al.'s "
                              "beta: higher trusts the best-matching atlases more sharply).")

    def joint_options(self) -> dict:
        """The keyword arguments of :func:`fadal.amplify.fuse.joint_vote` this config sets."""
        return {"radius_mm": self.joint_radius_mm, "sigma_hu": self.joint_sigma_hu, "alpha": self.joint_alpha,
                "beta": self.joint_beta}


class QCConfig(_Strict):
    """Quality control of each pseudo-label before it may be used for training (see amplify/qc.py)."""

    enabled: bool = Field(True, description="Run QC; off = every fused organ is accepted.")
    volume_factor: float = Field(3.0, ge=1, description="Flag an organ whose volume lies outside [min/f, max*f] "
                                 "of the reference volumes (the atlases that drew it, plus volume_ranges_ml). The "
                                 "prior of inter-patient spread, measured on OpenKBP's labeled cases: with two "
                                 "atlases, f = 3 keeps 96-100 % of other patients' organs inside (larynx 86 %), "
                                 "f = 1.5 only 62-91 %.")
    volume_ranges_ml: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Organ name -> (smallest, largest) volume (ml) aggregated over the "
        "federation's labeled scans (amplify/qc.py volume_ranges of the merged fingerprint): widens the atlases' "
        "range, so two atlases alone do not decide what a plausible organ is.")
    federation_volume_factor: float = Field(1.25, ge=1, description="The widening f when volume_ranges_ml has the "
                                            "organ (the federation's range already holds the inter-patient spread).")
    max_hu_difference: float = Field(400.0, gt=0, description="Flag an organ whose median HU differs by more than "
                                     "this from every atlas's median HU of it (the organ lies on the wrong tissue: air, "
                                     "soft tissue and bone are ~1000 and ~500 HU apart). 150 flagged 16 of 266 true "
                                     "OpenKBP organs (mandibles 156-369 HU off, air-filled oesophagi).")
    min_component_fraction: float = Field(0.8, ge=0, le=1, description="Flag an organ whose n largest connected "
                                          "components hold less than this fraction of its voxels (n = most "
                                          "components an atlas has for it, usually 1).")
    min_confidence: float = Field(0.7, ge=0, le=1, description="Flag an organ whose mean fusion confidence is "
                                  "lower (a majority vote of two atlases gives a fused organ 1: they must agree; "
                                  "the demo's three atlases give a half-wrong pancreas 0.68-0.77, other organs "
                                  "0.79-0.96).")
    demote_flagged: bool = Field(True, description="A flagged organ becomes unknown for that scan (its voxels get "
                                 "label 0 and confidence 0); off = any flag rejects the scan.")
    max_flagged_fraction: float = Field(0.5, ge=0, le=1, description="Reject the scan when more than this fraction "
                                        "of its fused organs is flagged (or none is left).")
