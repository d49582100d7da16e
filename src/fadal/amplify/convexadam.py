"""ConvexAdam registration (Siebert, Hansen & Heinrich, MICCAI 2021; PyPI ``convexadam``) behind the same
pair preparation, result record and cache as elastix.

ConvexAdam compares MIND-SSC self-similarity features (insensitive to scanner HU differences), finds a
coarse displacement by a discrete search of ``disp_hw`` steps on a grid of ``grid_sp`` voxels coupled by
convex optimisation (made inverse-consistent), then refines it by Adam instance optimisation with a
diffusion penalty. It takes two volumes on one grid and its search range is bounded, so the atlas is
first placed by FADAL's initial translation (:func:`fadal.amplify.register.prepare_pair`) and both
scans are resampled onto one isotropic grid (``spacing_mm``) over the fixed scan's extent, outside-body
voxels set to air (the table and padding then carry no features). The displacement (in voxels of that
grid) becomes a world displacement-field transform, and :func:`fadal.amplify.register.finish_pair`
warps, measures and stores as for elastix.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from fadal.amplify.geometry import grow, like
from fadal.config import RegistrationConfig

#: Bump when what a ConvexAdam entry computes changes (part of the cache key through the recipe).
RECIPE = "convexadam-1"
#: Shifted intensities (air = 0) are clipped here: metal and dense bone would dominate the features.
_MAX_SHIFTED = 2500.0


def work_grid(fixed: sitk.Image, spacing_mm: float, multiple: int) -> sitk.Image:
    """An isotropic grid over ``fixed``'s extent (same origin and direction), each size a multiple of ``multiple``."""
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    size = (np.ceil(extent / spacing_mm / multiple) * multiple).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing((spacing_mm,) * 3)
    grid.SetOrigin(fixed.GetOrigin())
    grid.SetDirection(fixed.GetDirection())
    return grid


def _on_grid(arr: np.ndarray, ref: sitk.Image, origin, grid: sitk.Image) -> np.ndarray:
    img = sitk.Resample(like(arr.astype(np.float32), ref, origin), grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return np.minimum(sitk.GetArrayFromImage(img), _MAX_SHIFTED)


def field_transform(disp_zyx: np.ndarray, grid: sitk.Image) -> sitk.Transform:
    """ConvexAdam's displacement (voxels of ``grid``, array axes z, y, x; fixed voxel i samples moving
    i + d) as a world displacement-field transform on ``grid``."""
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    world = (disp_zyx[..., ::-1] * np.asarray(grid.GetSpacing())) @ direction.T
    field = sitk.GetImageFromArray(world.astype(np.float64), isVector=True)
    field.CopyInformation(grid)
    return sitk.DisplacementFieldTransform(field)


def register_pair(pair, cfg: RegistrationConfig) -> tuple[sitk.Transform, dict]:
    """ConvexAdam's transform (fixed world -> atlas placed at ``pair.origin``) for a prepared pair
    (:class:`fadal.amplify.register.PreparedPair`), and what to store beside the result."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    ca = cfg.convexadam
    grid = work_grid(pair.fixed, ca.spacing_mm, int(np.lcm(ca.grid_sp, ca.grid_sp_adam)) * 2)
    margin = cfg.mask_margin_mm
    fixed_arr = np.where(grow(pair.fixed_body, pair.fixed, margin), pair.fixed_arr, 0.0)
    atlas_arr = np.where(grow(pair.atlas_body, pair.atlas, margin), pair.atlas_arr, 0.0)
    f = _on_grid(fixed_arr, pair.fixed, None, grid)
    m = _on_grid(atlas_arr, pair.atlas, pair.origin, grid)
    torch.manual_seed(cfg.seed)
    device = torch.device(ca.device if ca.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    disp = convex_adam_pt(torch.from_numpy(f), torch.from_numpy(m), mind_r=ca.mind_r, mind_d=ca.mind_d,
                          lambda_weight=ca.lambda_weight, grid_sp=ca.grid_sp, disp_hw=ca.disp_hw,
                          selected_niter=ca.iterations, grid_sp_adam=ca.grid_sp_adam, ic=True,
                          dtype=torch.float32, device=device)
    return (field_transform(np.asarray(disp, dtype=np.float64), grid),
            {"work_grid": {"size": list(grid.GetSize()), "spacing_mm": ca.spacing_mm}, "device": str(device)})
