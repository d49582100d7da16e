"""New labeled pairs from learned transforms (Zhao et al., CVPR 2019, "Data augmentation using learned
transformations for one-shot medical image segmentation").

Why: a site with two annotated scans has two label maps, but its unlabeled scans show how anatomy and
appearance really vary there. Registering each atlas (annotated scan) onto each unlabeled scan
*learns* that variation as transforms; re-combining them makes many new, realistic and correctly
labeled pairs, where random elastic augmentation would invent implausible anatomy.

What is learned, per (atlas a, unlabeled target t), on the network's preprocessed grid (orientation,
spacing, HU window: exactly what training sees, so the fields are small and fast to apply):

* **spatial transform** ``phi_t``: elastix affine + B-spline registration of the atlas onto the
  target, made robust the way amplify/register.py does it and with the same functions (body masks
  and NCC from :mod:`~fadal.amplify.geometry`, the searched initial translation of
  :mod:`~fadal.amplify.initialize`, the recipe of :mod:`~fadal.amplify.elastix`, the failure
  thresholds ``min_ncc``/``min_body_dice``: a failed registration is not sampled; the prepared
  (X, Y, Z) tensors reach them as SimpleITK images through :func:`geometry.image_from_affine`);
  transformix's deformation field gives, for every target voxel x,
  the atlas point ``phi_t(x)`` showing the same anatomy. It is stored as a ``grid_sample`` grid
  (float16) on the target's grid.
* **appearance transform** ``d_t`` (in the atlas frame): the target brought back into the atlas frame
  (``phi_t`` inverted by fixed-point iteration) minus the atlas, Gaussian-smoothed (normalised
  convolution over the voxels the target covers) and clipped. The smoothing keeps contrast and
  scanner differences and drops the target's residual, misregistered edges: those would paint
  anatomy the atlas label does not have. Because ``d_t`` lives in the atlas frame, adding it keeps
  image and label aligned. (Zhao et al. learn both with CNNs; here registration stands in for the
  spatial CNN, and a smoothed registration residual for the appearance CNN.)

A synthetic pair draws an atlas ``a``, a spatial transform ``phi_j`` and, independently, an appearance
transform ``d_k`` of that atlas, and a scale ``s``::

    image = (A + s * d_k) o phi_j        (bilinear, clipped to the window [0, 1])
    label = L_a o phi_j                  (nearest neighbour)

so one atlas with n targets gives n^2 combinations (times the continuous scale). Pairs are drawn on
the fly by :class:`SyntheticPairs`, a torch ``Dataset`` that ``fadal.model.patches.PatchSampler(extra=...)`` mixes into
training; nothing is written per pair. The learned transforms are cached at the site (content hash
of both preprocessed scans and the settings), never sent anywhere.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from fadal.amplify.elastix import deformation_field, run_elastix
from fadal.amplify.geometry import (axial_array_axis, body_mask_array, body_z_range, dice, grid_world_points, grow,
                                    image_from_affine, in_slab, ncc)
from fadal.amplify.initialize import initial_translation
from fadal.config import RegistrationConfig, SynthesisConfig
from fadal.records import PreprocessConfig
from fadal.data.io import PRIVATE, read_image, save_torch
from fadal.errors import FadalInputError
from fadal.data.preprocess import inference_transforms, to_metatensor, training_transforms

#: Bump when the way transforms are learned changes: old cache entries then no longer match.
RECIPE_VERSION = "synthesis-v4-shared-geometry-plain-tensors"
#: Voxels above this windowed intensity (HU -230 in the [-250, 750] window) are "body".
_BODY = 0.02


@dataclass
class Prepared:
    """One scan in the network's space: what training would see after the deterministic preprocessing."""

    case_id: str
    image: torch.Tensor  # (X, Y, Z) float32, windowed to [0, 1]
    affine: np.ndarray  # (4, 4) voxel -> world (RAS, mm)
    label: torch.Tensor | None = None  # (X, Y, Z) uint8
    known: list[int] = field(default_factory=list)  # class ids drawn in `label`


@dataclass
class LearnedTransform:
    """Spatial + appearance transform of one atlas, learned from one unlabeled target."""

    target: str
    grid: torch.Tensor  # (Xt, Yt, Zt, 3) float16: grid_sample coordinates into the atlas, on the target grid
    target_affine: np.ndarray  # (4, 4): the synthetic pair's geometry
    appearance: torch.Tensor | None  # (Xa, Ya, Za) float16 additive field on the atlas grid
    ncc_before: float  # NCC of target and atlas in the target's body, world coordinates as stored
    ncc_after: float  # ... after registration, where the warped atlas covers the target
    body_dice: float  # Dice of the target's and the warped atlas's body masks, there
    seconds: float
    cached: bool = False

    def failure(self, cfg: RegistrationConfig) -> str | None:
        """Why this transform counts as a failed registration (the thresholds of amplify/result.py), or None."""
        if not self.ncc_after >= cfg.min_ncc:
            return f"NCC {self.ncc_after:.3f} < min_ncc {cfg.min_ncc:g}"
        if not self.body_dice >= cfg.min_body_dice:
            return f"body Dice {self.body_dice:.3f} < min_body_dice {cfg.min_body_dice:g}"
        return None


def prepare(case_id: str, image: Path, pre: PreprocessConfig, label: Path | None = None,
            known: Sequence[int] = ()) -> Prepared:
    """Read a scan (and its label) and apply the same deterministic chain as training."""
    if label is not None:
        fixed = training_transforms(pre)
        d = fixed({"image": str(image), "label": str(label), "confidence": None})
        lab = d["label"].as_tensor()[0].round().to(torch.uint8)
    else:
        d = inference_transforms(pre)({"image": to_metatensor(read_image(image))})
        lab = None
    img = d["image"]
    return Prepared(case_id, img.as_tensor()[0].float().contiguous(), np.asarray(img.affine, dtype=np.float64),
                    lab, list(known))


# --------------------------------------------------------------------------------------------------
# learning one transform
# --------------------------------------------------------------------------------------------------

def _coarser(shape: Sequence[int], affine: np.ndarray, factor: int = 2) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid with ``factor`` x the spacing over the same region (same first voxel centre)."""
    a = affine.copy()
    a[:3, :3] = a[:3, :3] * factor
    return tuple(-(-n // factor) for n in shape), a


def _resample_field(field_: torch.Tensor, src_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> torch.Tensor:
    """A smooth field (X, Y, Z[, C]) on one grid, trilinearly resampled onto another (edges extended)."""
    src_shape = field_.shape[:3]
    return sample_volume(field_, world_to_grid(grid_world_points(shape, affine), src_affine, src_shape), padding="border")


def world_to_grid(points: np.ndarray | torch.Tensor, affine: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """World points (..., 3) -> grid_sample coordinates (..., 3) of a (X, Y, Z) volume.

    grid_sample on a (N, C, X, Y, Z) tensor reads the last grid axis as (Z, Y, X) index, normalised
    to [-1, 1] over the voxel centres (align_corners=True).
    """
    inv = torch.as_tensor(np.linalg.inv(affine), dtype=torch.float64)
    p = torch.as_tensor(points, dtype=torch.float64)
    idx = p @ inv[:3, :3].T + inv[:3, 3]
    size = torch.as_tensor([max(n - 1, 1) for n in shape], dtype=torch.float64)
    return (2.0 * idx / size - 1.0).flip(-1)


def sample_volume(volume: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """volume (X, Y, Z) or (X, Y, Z, C) sampled at grid (..., 3) -> (...,) or (..., C)."""
    vol = volume.float()
    channels = vol.ndim == 4
    v = vol.permute(3, 0, 1, 2)[None] if channels else vol[None, None]
    out = F.grid_sample(v, grid.float()[None], mode=mode, padding_mode=padding, align_corners=True)[0]
    return out.permute(1, 2, 3, 0) if channels else out[0]


def _ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """:func:`geometry.ncc` of (X, Y, Z) tensors (NaN for an empty mask: no shared body, nothing to compare)."""
    return ncc(a.numpy(), b.numpy(), mask.numpy())


def _body_zyx(img: sitk.Image) -> np.ndarray:
    """Body mask (z, y, x) of a prepared scan as an image: geometry's (largest component, holes filled)."""
    return body_mask_array(sitk.GetArrayViewFromImage(img), axial_array_axis(img), _BODY)


def _body(p: Prepared) -> torch.Tensor:
    """Body mask (X, Y, Z) of a prepared scan."""
    return torch.as_tensor(_body_zyx(image_from_affine(p.image.numpy(), p.affine)).transpose(2, 1, 0))


def _deformation(atlas: Prepared, target: Prepared, cfg: RegistrationConfig) -> np.ndarray:
    """World displacement (Xt, Yt, Zt, 3) mm: target voxel x shows the anatomy at atlas point x + u(x).

    As amplify/register.py does it, through the same functions (on the prepared scans as SimpleITK
    images, :func:`geometry.image_from_affine`): body masks, the atlas pre-translated by
    :func:`initialize.initial_translation` (survives scans covering different body lengths), fixed
    samples only in the craniocaudal slab where the atlas has body, the elastix recipe.
    """
    fixed, moving = image_from_affine(target.image.numpy(), target.affine), image_from_affine(atlas.image.numpy(), atlas.affine)
    fixed_arr, atlas_arr = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(moving)
    fixed_body, atlas_body = _body_zyx(fixed), _body_zyx(moving)
    t = initial_translation(fixed, moving, fixed_arr, atlas_arr, fixed_body, atlas_body, cfg)
    origin = atlas.affine[:3, 3] - t  # the atlas moved by -t: its point x + t now sits at x
    masks = None
    if cfg.use_body_masks and fixed_body.any() and atlas_body.any():
        margin = cfg.mask_margin_mm
        masks = (grow(fixed_body, fixed, margin) & in_slab(fixed, body_z_range(atlas_body, moving), t[2], margin),
                 grow(atlas_body, moving, margin))
    params = run_elastix(fixed, fixed_arr, moving, atlas_arr, origin, cfg, masks,
                         f"synthesis atlas {atlas.case_id} onto {target.case_id}", default_pixel_value=0.0)
    # The field is smooth (B-spline control points >= 20 mm apart): transformix evaluates it on a
    # grid of twice the spacing (8x fewer points; it costs more than the registration otherwise)
    # and it is interpolated back.
    c_shape, c_affine = _coarser(target.image.shape, target.affine)
    u = deformation_field(params, target.affine[:3, 3], np.linalg.norm(c_affine[:3, :3], axis=0), c_shape)
    u = torch.as_tensor(u.transpose(2, 1, 0, 3).astype(np.float32))  # (X, Y, Z, 3)
    u = _resample_field(u, c_affine, target.image.shape, target.affine).double()
    return (u + torch.as_tensor(t)).numpy()


def _invert(u_t: torch.Tensor, target: Prepared, y: torch.Tensor, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """For world points y (..., 3), the target points x with x + u(x) = y (fixed point x <- y - u(x)).

    Returns (x, valid): valid where the iteration converged to within half a voxel and x lies inside
    the target's grid. The fields are smooth, so a few iterations converge.
    """
    y = y.float()
    # world -> target grid_sample coordinates as one affine map (see world_to_grid)
    inv = np.linalg.inv(target.affine)
    scale = 2.0 / np.asarray([max(n - 1, 1) for n in target.image.shape], dtype=np.float64)
    m = torch.as_tensor((scale[:, None] * inv[:3, :3])[::-1].copy(), dtype=torch.float32)
    b = torch.as_tensor((scale * inv[:3, 3] - 1.0)[::-1].copy(), dtype=torch.float32)
    u = u_t.float()
    x = y - u.reshape(-1, 3).mean(0)
    for _ in range(iterations):
        x = y - sample_volume(u, x @ m.T + b, padding="border")
    g = x @ m.T + b
    residual = (x + sample_volume(u, g, padding="border") - y).norm(dim=-1)
    tol = 0.5 * float(np.linalg.norm(target.affine[:3, :3], axis=0).min())
    return x, (residual < tol) & (g.abs() <= 1.0).all(-1)


def _appearance(atlas: Prepared, target: Prepared, u_t: torch.Tensor, cfg: SynthesisConfig) -> torch.Tensor:
    """Smoothed (target in the atlas frame - atlas), on the atlas grid; see the module docstring.

    Computed on a grid of twice the atlas spacing (the result is smoothed far more than that) and
    interpolated back: 8x fewer points to invert the deformation for.
    """
    from scipy.ndimage import gaussian_filter

    c_shape, c_affine = _coarser(atlas.image.shape, atlas.affine)
    y = torch.as_tensor(grid_world_points(c_shape, c_affine), dtype=torch.float32)
    x, valid = _invert(u_t, target, y)
    t_in_atlas = sample_volume(target.image, world_to_grid(x, target.affine, target.image.shape))
    diff = t_in_atlas - sample_volume(atlas.image, world_to_grid(y, atlas.affine, atlas.image.shape))
    # A difference larger than any plausible appearance change is anatomy that registration did not
    # match (an edge, the body outline): it is left out rather than smeared into the field.
    valid = valid & (diff.abs() <= cfg.appearance_max)
    diff = (diff * valid).numpy().astype(np.float64)
    w = valid.numpy().astype(np.float64)
    sigma = cfg.appearance_sigma_mm / np.linalg.norm(c_affine[:3, :3], axis=0)
    num, den = gaussian_filter(diff, sigma, mode="constant"), gaussian_filter(w, sigma, mode="constant")
    field_ = torch.as_tensor(np.where(den > 0.1, num / np.maximum(den, 1e-6), 0.0), dtype=torch.float32)
    field_ = _resample_field(field_, c_affine, atlas.image.shape, atlas.affine)
    return field_.clamp(-cfg.appearance_max, cfg.appearance_max).half()


def transform_key(atlas: Prepared, target: Prepared, cfg: SynthesisConfig) -> str:
    """Content hash of both preprocessed scans (voxels and geometry) and the settings that shape a transform."""
    h = hashlib.sha256()
    for p in (atlas, target):
        h.update(np.ascontiguousarray(p.image.numpy()).tobytes())
        h.update(np.asarray(p.image.shape, dtype=np.int64).tobytes())
        h.update(np.round(p.affine, 6).tobytes())
    h.update(cfg.registration.model_dump_json(exclude={"workers"}).encode())
    h.update(json.dumps([cfg.appearance, cfg.appearance_sigma_mm, cfg.appearance_max]).encode())
    h.update(RECIPE_VERSION.encode())
    return h.hexdigest()[:24]


def learn_transform(atlas: Prepared, target: Prepared, cfg: SynthesisConfig, cache_dir: Path | None = None) -> LearnedTransform:
    """Register ``atlas`` onto ``target`` and derive the spatial and appearance transforms (cached)."""
    key = transform_key(atlas, target, cfg)
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return LearnedTransform(target.case_id, d["grid"], d["target_affine"].numpy(), d["appearance"],
                                    d["ncc_before"], d["ncc_after"], d["body_dice"], d["seconds"], cached=True)
        except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError):
            pass  # damaged entry: learn again and overwrite it
    t0 = time.perf_counter()
    u = torch.as_tensor(_deformation(atlas, target, cfg.registration))
    world = torch.as_tensor(grid_world_points(target.image.shape, target.affine))
    grid = world_to_grid(world + u, atlas.affine, atlas.image.shape).float()
    body = _body(target)
    identity = world_to_grid(world, atlas.affine, atlas.image.shape).float()
    ncc_before = _ncc(target.image, sample_volume(atlas.image, identity), body)
    # Quality where the warped atlas has data: inside its field of view, and within the axial
    # slab its body covers (an atlas showing a shorter body length is not a failure; register.py).
    warped_body = sample_volume(_body(atlas).float(), grid) > 0.5
    view = sample_volume(torch.ones_like(atlas.image), grid) > 0.5
    slices = torch.nonzero(warped_body.any(0).any(0)).flatten()
    if len(slices):
        view[..., : int(slices[0])] = False
        view[..., int(slices[-1]) + 1:] = False
    ncc_after = _ncc(target.image, sample_volume(atlas.image, grid), body & view)
    in_view = (body & view).numpy()
    body_dice = dice(in_view, (warped_body & view).numpy()) if in_view.any() else 0.0
    appearance = _appearance(atlas, target, u, cfg) if cfg.appearance == "field" else None
    out = LearnedTransform(target.case_id, grid.half(), target.affine, appearance, round(ncc_before, 4),
                           round(ncc_after, 4), round(body_dice, 4), round(time.perf_counter() - t0, 3))
    if path is not None:
        save_torch({"grid": out.grid, "target_affine": torch.from_numpy(np.array(out.target_affine)),
                    "appearance": out.appearance, "ncc_before": out.ncc_before, "ncc_after": out.ncc_after,
                    "body_dice": out.body_dice, "seconds": out.seconds,
                    "atlas": atlas.case_id, "target": target.case_id, "recipe": RECIPE_VERSION}, path, mode=PRIVATE)
    return out


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------

def synthesize(atlas: Prepared, spatial: LearnedTransform, appearance: LearnedTransform | None = None,
               scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic (image, label) on ``spatial``'s target grid: the atlas (plus ``scale`` x the
    appearance field) and its label, both warped by the same spatial transform."""
    if atlas.label is None:
        raise FadalInputError(f"synthesis: atlas {atlas.case_id} has no label")
    img = atlas.image
    if appearance is not None and appearance.appearance is not None and scale:
        img = img + scale * appearance.appearance.float()
    grid = spatial.grid.float()
    image = sample_volume(img, grid).clamp_(0.0, 1.0)
    label = sample_volume(atlas.label.float(), grid, mode="nearest").round().to(torch.uint8)
    return image, label


class SyntheticPairs(torch.utils.data.Dataset):
    """Synthetic labeled pairs drawn at random on every access (the index is ignored).

    ``len()`` sets the share (with ``PatchSampler(extra=[pairs])``)
    of synthetic pairs among the training samples. Items match the training loader's: ``image``,
    ``label`` and ``confidence`` as (1, X, Y, Z) MetaTensors with the target's affine, ``known`` as a
    (num_classes,) bool mask of the atlas's drawn organs, and ``synthetic`` = (atlas, spatial target,
    appearance target, scale) in :meth:`sample` (not in training items) for inspection.
    """

    def __init__(self, atlases: Sequence[Prepared], transforms: Sequence[Sequence[LearnedTransform]],
                 num_classes: int, length: int, appearance_scale: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> None:
        keep = [(a, list(t)) for a, t in zip(atlases, transforms) if t]
        if not keep:
            raise FadalInputError("synthesis: no usable transform (every registration was rejected or none was learned)")
        self.atlases = [a for a, _ in keep]
        self.transforms = [t for _, t in keep]
        self.num_classes = num_classes
        self.length = int(length)
        self.appearance_scale = appearance_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.rejected: list[dict] = []  # transforms left out (failed registrations), for summary()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        item = self.sample()
        item.pop("synthetic")
        item["version"] = "synthetic"  # the keys of the loader's real items, so mixed batches collate
        return item

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def sample(self) -> dict:
        from monai.data import MetaTensor

        a = self._randint(len(self.atlases))
        atlas, options = self.atlases[a], self.transforms[a]
        spatial, appearance = options[self._randint(len(options))], options[self._randint(len(options))]
        lo, hi = self.appearance_scale
        scale = lo + (hi - lo) * float(torch.rand((), generator=self.generator))
        image, label = synthesize(atlas, spatial, appearance, scale)
        affine = torch.as_tensor(spatial.target_affine, dtype=torch.float64)
        known = torch.zeros(self.num_classes, dtype=torch.bool)
        known[0] = True
        known[list(atlas.known)] = True
        return {
            "image": MetaTensor(image[None], affine=affine),
            "label": MetaTensor(label[None].float(), affine=affine),
            "confidence": MetaTensor(torch.ones_like(image)[None], affine=affine),
            "known": known,
            "synthetic": (atlas.case_id, spatial.target, appearance.target, round(scale, 3)),
        }

    def summary(self) -> dict:
        """What the sampler draws from (for provenance / results files)."""
        return {
            "atlases": [a.case_id for a in self.atlases],
            "transforms": {a.case_id: [{"target": t.target, "ncc_before": t.ncc_before, "ncc_after": t.ncc_after,
                                        "body_dice": t.body_dice, "seconds": t.seconds, "cached": t.cached}
                                       for t in ts]
                           for a, ts in zip(self.atlases, self.transforms)},
            "rejected": self.rejected,
            "combinations": sum(len(ts) ** 2 for ts in self.transforms),
        }


def build_synthesizer(atlases: Sequence[tuple[str, Path, Path, Sequence[int]]], targets: Sequence[tuple[str, Path]],
                      pre: PreprocessConfig, cfg: SynthesisConfig, num_classes: int, length: int,
                      cache_dir: Path | None = None,
                      progress: Callable[[int, int], None] | None = None) -> SyntheticPairs:
    """Learn (or load from ``cache_dir``) every atlas -> target transform and return the sampler.

    ``atlases`` = ``[(case_id, image, label, drawn class ids)]``, ``targets`` = ``[(case_id, image)]``
    (each atlas uses the first ``cfg.max_targets``). Transforms whose registration ends below
    fails ``cfg.registration``'s thresholds (``min_ncc``, ``min_body_dice``: a failed registration would
    teach a wrong label) are left out and listed in ``summary()["rejected"]``. Registration runs in this process with the caller's
    ITK thread setting.
    """
    prepared_targets = [prepare(c, img, pre) for c, img in targets[: cfg.max_targets]]
    prepared_atlases = [prepare(c, img, pre, lab, known) for c, img, lab, known in atlases]
    total, done = len(prepared_atlases) * len(prepared_targets), 0
    learned: list[list[LearnedTransform]] = []
    rejected: list[dict] = []
    for atlas in prepared_atlases:
        per_atlas = []
        for target in prepared_targets:
            t = learn_transform(atlas, target, cfg, cache_dir)
            why = t.failure(cfg.registration)
            if why is None:
                per_atlas.append(t)
            else:
                rejected.append({"atlas": atlas.case_id, "target": target.case_id, "reason": why})
            done += 1
            if progress is not None:
                progress(done, total)
        learned.append(per_atlas)
    pairs = SyntheticPairs(prepared_atlases, learned, num_classes, length, cfg.appearance_scale, cfg.seed)
    pairs.rejected = rejected
    return pairs


def synthetic_length(cfg: SynthesisConfig, n_items: int) -> int:
    """How many synthetic draws make them a share ``cfg.fraction`` of the samples beside ``n_items`` real ones."""
    return max(1, round(cfg.fraction / (1.0 - cfg.fraction) * n_items))


def site_synthesizer(site, pre: PreprocessConfig, cfg: SynthesisConfig, cache_dir: Path, length: int,
                     max_atlases: int | None = None) -> SyntheticPairs:
    """:func:`build_synthesizer` for a :class:`fadal.data.site.Site`: its labeled cases are the atlases,
    its unlabeled cases the targets; ``cache_dir`` should be inside the site (fields never leave it)."""
    labeled = site.labeled[:max_atlases] if max_atlases else site.labeled
    atlases = [(c.case_id, c.image, c.label, site.annotated_ids(c)) for c in labeled]
    targets = [(c.case_id, c.image) for c in site.unlabeled]
    return build_synthesizer(atlases, targets, pre, cfg, site.num_classes, length, cache_dir)
