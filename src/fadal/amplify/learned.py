"""Learned registration: a VoxelMorph-style network trained on a site's own scans, one forward pass per pair.

elastix optimises every (scan, atlas) pair from scratch (~8 s per 128^3 pair on 2 threads); a site
that amplifies hundreds of scans pays that hundreds of times. Here a network is trained once per
site on *unlabeled* pairs of its own scans (labeled or not: no label is used, so every scan counts),
unsupervised: local NCC of the warped moving scan and the fixed scan plus a diffusion penalty on the
field (MONAI's ``VoxelMorph``/``VoxelMorphUNet``, ``LocalNormalizedCrossCorrelationLoss``,
``DiffusionLoss``). Propagating an atlas is then :func:`register.prepare_pair` (body masks and the
initial-translation search, exactly as for elastix) plus one forward pass; the label and the atlas
scan are warped on the fixed scan's own grid by :func:`register.finish_pair`, which also measures
the quality the failure detection and the fusion use. The checkpoint stays at the site.

Design, and why:

* **Affine part = the initial translation** (:func:`initialize.initial_translation`, ``"search"``).
  elastix's affine stage alone costs seconds per pair, more than the whole budget of a learned
  pair; the network is diffeomorphic (scaling and squaring) and handles the residual scale and
  shape differences between two patients' same body region. Training pairs are placed the same
  way: every scan is translated once onto a reference scan (``N - 1`` searches, not ``N^2``), and
  pair ``(i, j)`` uses ``t_iR - t_jR``.
* **Network grid**: world-axis-aligned, isotropic ``spacing_mm`` (6 mm; an OpenKBP head-and-neck
  scan gives 40 x 40 x 32 voxels), around the fixed scan's body (its bounding box plus a margin):
  the air around the body is much of the field of view and teaches the network nothing. CPU cost
  is dominated by the full-resolution layers, hence few channels (measured on 56 x 48 x 48, one
  thread, loaded machine: 1.5 s per training step with (8, 16, 16, 16), 3.9 s with (16, 32, 32, 32)). Scans are Gaussian-smoothed to the grid spacing before
  sampling (anti-aliasing), and windowed to [0, 1] with ``hu_window``.
* **Field**: the network's displacement (voxels of the grid) becomes a world displacement field
  that ``SimpleITK`` interpolates linearly at every fixed voxel; the label is warped by nearest
  neighbour, so labels stay integers and lie on the fixed scan's exact grid. Outside the network
  grid (air beyond the body margin) only the translation applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from fadal.amplify.cache import KEY_CHARS, load_cached, pair_key, path_digest
from fadal.amplify.geometry import AIR_HU, axial_array_axis, body_mask_array, like, read_3d, shifted, world_points
from fadal.amplify.initialize import initial_translation
from fadal.amplify.register import PreparedPair, finish_pair, prepare_pair
from fadal.amplify.result import RegistrationResult
from fadal.config import LearnedRegistrationConfig, RegistrationConfig
from fadal.data.io import PRIVATE, save_torch
from fadal.errors import FadalInputError

#: Bump when training or propagation changes: cached models and propagated labels then no longer match.
LEARNED_RECIPE = "voxelmorph-v1-translation-init"
#: Margin (mm) around the fixed body's bounding box that the network grid covers.
_GRID_MARGIN_MM = 12.0
#: Network grid sizes are multiples of this (the U-Net halves the grid at each level).
_MULTIPLE = 8


@dataclass
class SiteModel:
    """A trained network and what it was trained with (``key``: content hash of the scans and settings)."""

    net: torch.nn.Module
    cfg: LearnedRegistrationConfig
    key: str
    path: Path | None = None
    train_seconds: float = 0.0
    losses: list[float] | None = None


# --------------------------------------------------------------------------------------------------
# network and images
# --------------------------------------------------------------------------------------------------

def build_network(cfg: LearnedRegistrationConfig) -> torch.nn.Module:
    """MONAI VoxelMorph with a small U-Net: full-resolution layers dominate the cost on CPU."""
    from monai.networks.nets import VoxelMorph, VoxelMorphUNet

    if len(cfg.channels) < 2 or len(cfg.channels) % 2:
        raise FadalInputError(f"learned registration: channels must be an even number (>= 2) of sizes, got {cfg.channels}")
    width = cfg.channels[0]
    backbone = VoxelMorphUNet(spatial_dims=3, in_channels=2, unet_out_channels=width, channels=cfg.channels,
                              final_conv_channels=(width, width))
    return VoxelMorph(backbone=backbone, integration_steps=cfg.integration_steps)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's CPU thread count inside the block (0 = leave it), restored after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _smoothed(arr: np.ndarray, ref: sitk.Image, origin, spacing_mm: float) -> sitk.Image:
    """Shifted intensities (air = 0) as an image at ``origin``, blurred to about the network's voxel size."""
    img = like(arr, ref, origin)
    sigma = [max(0.0, 0.5 * (spacing_mm ** 2 - s ** 2)) ** 0.5 for s in ref.GetSpacing()]
    return sitk.SmoothingRecursiveGaussian(img, sigma) if max(sigma) > 0 else img


def network_grid(fixed: sitk.Image, fixed_body: np.ndarray, spacing_mm: float) -> sitk.Image:
    """World-axis-aligned isotropic grid around the fixed scan's body (its whole extent if it has none)."""
    pts = world_points(fixed_body, fixed) if fixed_body.any() else None
    if pts is None or len(pts) == 0:
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
        d = np.asarray(fixed.GetDirection(), dtype=float).reshape(3, 3)
        ext = (np.asarray(fixed.GetSize()) - 1) * np.asarray(fixed.GetSpacing())
        pts = np.asarray(fixed.GetOrigin()) + (corners * ext) @ d.T
    lo, hi = pts.min(0) - _GRID_MARGIN_MM, pts.max(0) + _GRID_MARGIN_MM
    size = np.ceil((hi - lo) / spacing_mm / _MULTIPLE).astype(int) * _MULTIPLE
    centre = (lo + hi) / 2.0
    origin = centre - (size - 1) / 2.0 * spacing_mm
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing((float(spacing_mm),) * 3)
    grid.SetOrigin(tuple(float(v) for v in origin))
    return grid


def _on_grid(img: sitk.Image, grid: sitk.Image, cfg: LearnedRegistrationConfig,
             transform: sitk.Transform | None = None) -> torch.Tensor:
    """Linear resampling onto the network grid, windowed to [0, 1]: a (1, 1, z, y, x) tensor."""
    arr = sitk.GetArrayFromImage(sitk.Resample(img, grid, transform or sitk.Transform(), sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    lo, hi = (w - AIR_HU for w in cfg.hu_window)  # the images hold shifted intensities
    arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]


def _losses(cfg: LearnedRegistrationConfig):
    from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

    return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=cfg.lncc_kernel), DiffusionLoss()


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------

def site_key(scans: Sequence[Path], cfg: RegistrationConfig) -> str:
    """Content hash of the (sorted) scans, the learned settings, the initialisation settings and the recipe."""
    h = hashlib.sha256()
    for d in sorted(path_digest(p) for p in scans):
        h.update(d)
    h.update(cfg.learned.model_dump_json(exclude={"num_threads"}).encode())
    h.update(cfg.model_dump_json(include={"initialization", "init_step_mm", "init_coarse_mm"}).encode())
    h.update(LEARNED_RECIPE.encode())
    return h.hexdigest()[: KEY_CHARS]


@dataclass
class _Scan:
    image: sitk.Image  # smoothed shifted intensities
    grid: sitk.Image  # its network grid when it is the fixed scan
    fixed: torch.Tensor  # itself on that grid
    t_ref: np.ndarray  # initial translation from the reference scan: its point x shows this scan's x + t_ref


def _load_scans(scans: Sequence[Path], cfg: RegistrationConfig) -> list[_Scan]:
    """Read, smooth and place every scan: translation onto the first scan (the reference)."""
    out: list[_Scan] = []
    ref = None
    for p in scans:
        img = read_3d(Path(p))
        arr = shifted(img)
        body = body_mask_array(arr + AIR_HU, axial_array_axis(img))
        if ref is None:
            ref = (img, arr, body)
            t = np.zeros(3)
        else:
            t = initial_translation(ref[0], img, ref[1], arr, ref[2], body, cfg)
        smooth = _smoothed(arr, img, img.GetOrigin(), cfg.learned.spacing_mm)
        grid = network_grid(img, body, cfg.learned.spacing_mm)
        out.append(_Scan(smooth, grid, _on_grid(smooth, grid, cfg.learned), np.asarray(t, dtype=float)))
    return out


def _select(scans: Sequence[Path], n: int) -> list[Path]:
    """At most ``n`` of the scans, sorted and spread over the list (deterministic for a given set)."""
    scans = sorted(Path(p) for p in scans)
    return scans if len(scans) <= n else [scans[int(k * len(scans) / n)] for k in range(n)]


def train(scans: Sequence[Path], cfg: RegistrationConfig, log: Callable[[str], None] | None = None) -> SiteModel:
    """Train the network on random ordered pairs of ``scans`` (no labels); return it with its loss history.

    Each step: fixed scan ``i`` on its grid, moving scan ``j`` placed by ``t_iR - t_jR`` (see the
    module docstring), loss = local NCC + ``smooth_weight`` x diffusion of the field.
    """
    lc = cfg.learned
    scans = _select(scans, lc.max_scans)
    if len(scans) < 2:
        raise FadalInputError(f"learned registration needs at least 2 scans of the site to train on, got {len(scans)}")
    key = site_key(scans, cfg)
    t0 = time.perf_counter()
    with _threads(lc.num_threads):
        torch.manual_seed(lc.seed)
        rng = np.random.default_rng(lc.seed)
        data = _load_scans(scans, cfg)
        net = build_network(lc)
        opt = torch.optim.Adam(net.parameters(), lr=lc.lr)
        sim, smooth = _losses(lc)
        losses = []
        net.train()
        for step in range(lc.steps):
            i, j = rng.choice(len(data), size=2, replace=False)
            fi, mj = data[i], data[j]
            moving = _on_grid(mj.image, fi.grid, lc, sitk.TranslationTransform(3, [float(v) for v in mj.t_ref - fi.t_ref]))
            warped, ddf = net(moving, fi.fixed)
            loss = sim(warped, fi.fixed) + lc.smooth_weight * smooth(ddf)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            if log is not None and (step + 1) % max(1, lc.steps // 10) == 0:
                log(f"step {step + 1}/{lc.steps}: loss {np.mean(losses[-max(1, lc.steps // 10):]):.4f}")
        net.eval()
    return SiteModel(net=net, cfg=lc, key=key, train_seconds=time.perf_counter() - t0, losses=losses)


def save_model(model: SiteModel, path: Path) -> Path:
    """Atomic checkpoint (state dict, settings, key, loss history): it never leaves the site."""
    path = save_torch({"state_dict": model.net.state_dict(), "learned": model.cfg.model_dump(mode="json"),
                       "key": model.key, "recipe": LEARNED_RECIPE, "train_seconds": model.train_seconds,
                       "losses": model.losses}, path, mode=PRIVATE)
    model.path = path
    return path


def load_model(path: Path) -> SiteModel:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        lc = LearnedRegistrationConfig.model_validate(ckpt["learned"])
        net = build_network(lc)
        net.load_state_dict(ckpt["state_dict"])
    except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as err:
        raise FadalInputError(f"{path}: not a usable learned-registration checkpoint ({err})") from err
    net.eval()
    return SiteModel(net=net, cfg=lc, key=ckpt["key"], path=path, train_seconds=ckpt.get("train_seconds", 0.0),
                     losses=ckpt.get("losses"))


def site_model(scans: Sequence[Path], model_dir: Path, cfg: RegistrationConfig,
               log: Callable[[str], None] | None = None) -> SiteModel:
    """The site's model: loaded from ``model_dir/<site_key>.pt`` if trained before on the same scans and settings, else trained and saved."""
    scans = _select(scans, cfg.learned.max_scans)
    path = Path(model_dir) / f"{site_key(scans, cfg)}.pt"
    if path.is_file():
        try:
            return load_model(path)
        except FadalInputError:
            pass  # damaged checkpoint: train again and overwrite it
    model = train(scans, cfg, log)
    save_model(model, path)
    return model


# --------------------------------------------------------------------------------------------------
# propagation
# --------------------------------------------------------------------------------------------------

def displacement_transform(model: SiteModel, pair: PreparedPair) -> sitk.Transform:
    """One forward pass: the fixed-world -> placed-atlas displacement as a ``sitk`` transform."""
    lc = model.cfg
    grid = network_grid(pair.fixed, pair.fixed_body, lc.spacing_mm)
    fixed_t = _on_grid(_smoothed(pair.fixed_arr, pair.fixed, pair.fixed.GetOrigin(), lc.spacing_mm), grid, lc)
    moving_t = _on_grid(_smoothed(pair.atlas_arr, pair.atlas, pair.origin, lc.spacing_mm), grid, lc)
    with torch.no_grad():
        _, ddf = model.net(moving_t, fixed_t)
    # (1, 3, z, y, x) voxel displacements along the array axes (z, y, x) -> world (x, y, z) mm per voxel.
    disp = ddf[0].numpy()[::-1].transpose(1, 2, 3, 0) * lc.spacing_mm
    field = sitk.GetImageFromArray(np.ascontiguousarray(disp, dtype=np.float64), isVector=True)
    field.CopyInformation(grid)
    return sitk.DisplacementFieldTransform(field)


def propagate(model: SiteModel, fixed_image: Path, atlas_image: Path, atlas_label: Path, out_dir: Path,
              cfg: RegistrationConfig) -> RegistrationResult:
    """Warp ``atlas_label`` (and the atlas scan) onto ``fixed_image``'s grid: initial translation + one forward pass.

    Same files, cache and quality measures as :func:`register.register_atlas` (``<key>.nii.gz``,
    ``<key>_image.nii.gz``, ``<key>.json``), keyed by the pair's content, the settings and the model.
    """
    fixed_image, atlas_image, atlas_label, out_dir = map(Path, (fixed_image, atlas_image, atlas_label, out_dir))
    key = hashlib.sha256(f"{pair_key(fixed_image, atlas_image, atlas_label, cfg)}:{model.key}:{LEARNED_RECIPE}"
                         .encode()).hexdigest()[: KEY_CHARS]
    hit = load_cached(key, out_dir, fixed_image, atlas_image, atlas_label)
    if hit is not None:
        return hit
    with _threads(model.cfg.num_threads):
        t0 = time.perf_counter()
        pair = prepare_pair(fixed_image, atlas_image, atlas_label, cfg)
        transform = displacement_transform(model, pair)
        return finish_pair(pair, transform, out_dir, cfg, key, t0, recipe=LEARNED_RECIPE,
                               extra={"model": model.key, "model_path": None if model.path is None else str(model.path)})


def register_many(model: SiteModel, pairs: list[tuple[Path, Path, Path]], out_dir: Path, cfg: RegistrationConfig,
                  progress: Callable[[RegistrationResult], None] | None = None) -> list[RegistrationResult]:
    """:func:`propagate` each ``(fixed_image, atlas_image, atlas_label)`` pair in this process, in order.

    One process suffices: a pair is a second or two, and torch uses ``cfg.learned.num_threads``.
    """
    results = []
    for fixed, atlas, label in pairs:
        res = propagate(model, fixed, atlas, label, out_dir, cfg)
        results.append(res)
        if progress is not None:
            progress(res)
    return results

