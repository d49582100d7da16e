"""Atlas registration with itk-elastix: initial translation, affine then B-spline, in body masks.

One *pair* is (fixed scan, atlas scan, atlas label). :func:`register_atlas` aligns the atlas scan to
the fixed scan in physical space (grids, spacings and orientations may differ), warps the atlas label
and the atlas scan onto the fixed scan's voxel grid, and caches the result under a content hash of
the inputs and the configuration, so re-running an amplification never registers the same pair twice.
:func:`register_many` runs many pairs in worker processes, one ITK thread each (on a small machine,
several single-threaded registrations beat one multi-threaded one, and a crash in elastix only
takes down its worker).

Why each step (real CT is not a phantom):

* **Body masks** (:func:`body_mask_array`: HU > -500, opened, largest component, closed, holes
  filled per axial slice), grown by ``mask_margin_mm``, are elastix's fixed and moving masks, so the
  table, the air and whatever lies outside the patient do not drive the metric. The margin keeps
  the skin inside both masks: with exact masks neither side sees the other's body bulge out of its
  own (measured on a phantom: body Dice 0.93 exact, 0.985 with 10 mm).
* **Scanned length**: scans cover different craniocaudal stretches of the body (and some datasets
  pad the rest with air). :func:`body_z_range` is the stretch a scan shows body in. The fixed mask
  is limited to the stretch the atlas covers (elsewhere fixed samples could only match air), and
  the similarity measures are taken inside the common stretch.
* **Initialisation** (:func:`initial_translation`): aligning image centres, or body centres of
  gravity, is off by up to half the difference in scanned length (OpenKBP kbp_001 onto kbp_004: 37
  and 62 mm craniocaudally). ``"search"`` tries craniocaudal offsets, each with the in-plane
  centres of the common body slab aligned, and keeps the best NCC on coarse images (there: 2 mm
  off). The atlas is shifted by that translation (its origin moves) before elastix starts, with
  elastix's own initialisation off.
* **Failure detection** (:func:`registration_failure`): after registration, the Dice of the fixed
  and warped-atlas body masks and the NCC of the two scans in the fixed body, both inside the
  stretch the warped atlas covers (an atlas showing a shorter stretch is not punished for it), and
  the fraction of the expected common body still covered, are compared with thresholds of the
  configuration. The thresholds are not part of the cache key: changing them needs no new
  registration.
* **Warping** goes through a displacement field sampled at a quarter of the B-spline spacing
  (:func:`_displacement`), not transformix at every voxel: 0.8 s instead of 4.7 s on 128^3.

Intensities: CT in HU is shifted to ``max(HU, -1024) + 1024`` (air = 0) before registration. The
shift changes none of the metrics (mutual information, correlation, and mean squares since both
images are shifted alike), and it makes 0 (what fills the border of a resampled atlas) mean air.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fadal.config import RegistrationConfig
from fadal.data.io import PRIVATE, read_image, same_geometry, write_image, write_json
from fadal.errors import FadalInputError

#: Bump when the registration recipe changes: old cache entries then no longer match.
RECIPE_VERSION = "elastix-affine-bspline-v2-masks-init"
#: Voxels above this HU are "body".
BODY_HU = -500.0
AIR_HU = -1024.0
KEY_CHARS = 24
#: Settings that do not change a registration's result, so they are not part of its cache key.
_NOT_IN_KEY = {"workers", "min_body_dice", "min_ncc", "min_overlap"}
#: Pixel value elastix writes outside the atlas's field of view (shifted intensities are >= 0).
_OUTSIDE = -1.0


class RegistrationFailed(FadalInputError):
    """elastix gave up on a pair (e.g. the scans do not overlap): a failed atlas, not bad input."""


@dataclass
class RegistrationResult:
    """One registered pair (see the module docstring for the quality measures).

    ``metric_before``: NCC in the fixed body with no registration (world coordinates as stored);
    ``metric_init``: after the initial translation; ``metric_after``: after elastix. ``body_dice``,
    ``overlap``: body-mask Dice and covered fraction of the fixed body after registration.
    ``init_translation_mm``: the initial translation (fixed -> atlas world coordinates).
    """

    fixed: Path
    moving: Path
    warped_label: Path
    metric_before: float
    metric_after: float
    seconds: float
    cached: bool
    atlas_label: Path | None = None
    key: str = ""
    metric_name: str = field(default="ncc_body")
    warped_image: Path | None = None
    metric_init: float = float("nan")
    body_dice: float = float("nan")
    overlap: float = float("nan")
    init_translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str | None = None  # elastix gave up (register_many(errors="record")); no files then

    _PATHS = ("fixed", "moving", "warped_label", "atlas_label", "warped_image")

    def to_json(self) -> dict:
        out = asdict(self)
        for k in self._PATHS:
            out[k] = None if out[k] is None else str(out[k])
        out["init_translation_mm"] = [float(v) for v in self.init_translation_mm]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "RegistrationResult":
        data = dict(data)
        for k in cls._PATHS:
            if data.get(k) is not None:
                data[k] = Path(data[k])
        if "init_translation_mm" in data:
            data["init_translation_mm"] = tuple(data["init_translation_mm"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def registration_failure(res: RegistrationResult, cfg: RegistrationConfig) -> str | None:
    """Why ``res`` counts as a failed registration under ``cfg``'s thresholds, or ``None`` if it does not."""
    if res.error is not None:
        return res.error
    problems = []
    if not res.overlap >= cfg.min_overlap:  # also catches NaN
        problems.append(f"warped atlas covers {res.overlap:.2f} of the body < min_overlap {cfg.min_overlap:g}")
    if not res.body_dice >= cfg.min_body_dice:
        problems.append(f"body-mask Dice {res.body_dice:.3f} < min_body_dice {cfg.min_body_dice:g}")
    if not res.metric_after >= cfg.min_ncc:
        problems.append(f"NCC {res.metric_after:.3f} < min_ncc {cfg.min_ncc:g}")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------------------------------
# cache key
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """sha256 of a file's bytes, remembered per (path, size, mtime): a site's scans recur in many pairs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def pair_key(fixed_image: Path, atlas_image: Path, atlas_label: Path, cfg: RegistrationConfig) -> str:
    """Content hash of the three input files, the registration settings and the recipe version.

    Settings that change no result (``workers``, the failure thresholds) are left out.
    """
    h = hashlib.sha256()
    for p in (fixed_image, atlas_image, atlas_label):
        p = Path(p)
        if not p.is_file():
            raise FadalInputError(f"{p}: file not found")
        st = p.stat()
        h.update(file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns))
    # elastix keys leave out the learned-model settings: caches from before they existed stay valid.
    exclude = _NOT_IN_KEY | ({"method", "learned"} if cfg.method == "elastix" else set())
    h.update(cfg.model_dump_json(exclude=exclude).encode())
    h.update(RECIPE_VERSION.encode())
    return h.hexdigest()[:KEY_CHARS]


def load_cached(key: str, out_dir: Path, fixed: Path, moving: Path, label: Path) -> RegistrationResult | None:
    js, nii, img = out_dir / f"{key}.json", out_dir / f"{key}.nii.gz", out_dir / f"{key}_image.nii.gz"
    if not (js.is_file() and nii.is_file() and img.is_file()):
        return None
    try:
        res = RegistrationResult.from_json(json.loads(js.read_text()))
    except (ValueError, TypeError):
        return None  # damaged entry: register again (and overwrite it)
    # Same content may sit under other names or in a moved folder: report what the caller passed.
    res.fixed, res.moving, res.atlas_label, res.warped_label = Path(fixed), Path(moving), Path(label), nii
    res.warped_image = img
    res.cached = True
    return res


# --------------------------------------------------------------------------------------------------
# image helpers
# --------------------------------------------------------------------------------------------------

def read_3d(path: Path) -> sitk.Image:
    img = read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise FadalInputError(
            f"{path}: expected a 3D single-channel volume, got dimension {img.GetDimension()} "
            f"with {img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return img


def shifted(img: sitk.Image) -> np.ndarray:
    """HU -> float32 with air = 0 (see module docstring)."""
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    np.maximum(arr, AIR_HU, out=arr)
    arr -= AIR_HU
    return arr


def like(arr: np.ndarray, ref: sitk.Image, origin=None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    return img


def _load_elastix() -> None:
    import itk

    itk.ParameterObject.New()


def _to_itk(arr: np.ndarray, ref: sitk.Image, origin=None):
    import itk

    im = itk.image_from_array(np.ascontiguousarray(arr))
    im.SetSpacing([float(s) for s in ref.GetSpacing()])
    im.SetOrigin([float(o) for o in (ref.GetOrigin() if origin is None else origin)])
    im.SetDirection(itk.matrix_from_array(np.asarray(ref.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return im


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if mask.sum() < 2:
        return float("nan")
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    n = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / n if n else float("nan")


def axial_array_axis(img: sitk.Image) -> int:
    """Array axis (z, y, x order) that runs most nearly along world z (craniocaudal)."""
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(d[2])))


def body_mask_array(hu: np.ndarray, axial_axis: int = 0, threshold_hu: float = BODY_HU) -> np.ndarray:
    """The patient's body in a CT array (HU): thresholded, opened (detaches a thin table or cables),
    largest connected component, closed, and holes filled in each axial slice (lungs and bowel gas
    are inside the body, though below the threshold). Returns a bool array."""
    m = hu > threshold_hu
    if not m.any():
        return m
    # Erosions treat the volume's edge as body: a body cut by the field of view continues beyond it.
    m = ndimage.binary_dilation(ndimage.binary_erosion(m, border_value=1))
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    m = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    m = ndimage.binary_erosion(ndimage.binary_dilation(m, iterations=2), iterations=2, border_value=1)
    # Fill holes slice by slice: label the background with in-plane connectivity only (one pass;
    # ndimage.binary_fill_holes iterates a dilation to convergence, ~10x slower here), and keep as
    # background the components that touch a slice's edge.
    plane = np.zeros((3, 3, 3), dtype=bool)
    idx: list = [slice(None)] * 3
    idx[axial_axis] = 1
    plane[tuple(idx)] = ndimage.generate_binary_structure(2, 1)
    lab, _ = ndimage.label(~m, structure=plane)
    edge = []
    for ax in range(3):
        if ax != axial_axis:
            edge += [np.take(lab, 0, axis=ax).ravel(), np.take(lab, -1, axis=ax).ravel()]
    outside = np.zeros(lab.max() + 1, dtype=bool)
    outside[np.concatenate(edge)] = True
    outside[0] = False  # label 0 is the body itself
    return ~outside[lab]


def _grow(mask: np.ndarray, img: sitk.Image, mm: float) -> np.ndarray:
    """Dilate ``mask`` by a ball of ``mm`` (at least one voxel per axis when ``mm > 0``); SimpleITK's
    dilation is 5x faster than scipy's here."""
    if mm <= 0:
        return mask
    radius = [max(1, int(round(mm / s))) for s in img.GetSpacing()]
    return sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), radius,
                                                    sitk.sitkBall)) > 0


def body_mask(image: sitk.Image, threshold_hu: float = BODY_HU) -> sitk.Image:
    """:func:`body_mask_array` of a CT image, as a uint8 image on its grid."""
    arr = sitk.GetArrayViewFromImage(image)
    return like(body_mask_array(arr, axial_array_axis(image), threshold_hu).astype(np.uint8), image)


# --------------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------------

def world_points(mask: np.ndarray, img: sitk.Image, max_points: int = 200_000) -> np.ndarray:
    """World coordinates (N, 3) of the True voxels of a (z, y, x) array on ``img``'s grid (subsampled)."""
    idx = np.argwhere(mask)
    if len(idx) > max_points:
        idx = idx[:: len(idx) // max_points + 1]
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    return np.asarray(img.GetOrigin()) + (idx[:, ::-1] * np.asarray(img.GetSpacing())) @ d.T


def _image_centre(img: sitk.Image) -> np.ndarray:
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    half = (np.asarray(img.GetSize()) - 1) / 2.0 * np.asarray(img.GetSpacing())
    return np.asarray(img.GetOrigin()) + d @ half


def _world_z(img: sitk.Image) -> np.ndarray:
    """World z (craniocaudal, mm) of every voxel, as a (z, y, x) array."""
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)[2] * np.asarray(img.GetSpacing())
    nx, ny, nz = img.GetSize()
    z = img.GetOrigin()[2] + d[0] * np.arange(nx)[None, None, :] + d[1] * np.arange(ny)[None, :, None] \
        + d[2] * np.arange(nz)[:, None, None]
    return np.broadcast_to(z, (nz, ny, nx)).astype(np.float32)


def body_z_range(mask: np.ndarray, img: sitk.Image, bin_mm: float = 5.0, min_area: float = 0.1) -> tuple[float, float]:
    """Craniocaudal extent (world z, mm) of the scanned body: the 5 mm slabs holding at least 10 % of
    the largest slab's body voxels. The threshold ignores thin strays (a cable, the tip of a chin rest)
    that would otherwise stretch the extent."""
    z = world_points(mask, img)[:, 2]
    edges = np.arange(z.min(), z.max() + bin_mm, bin_mm)
    if len(edges) < 2:
        return float(z.min()), float(z.max())
    counts, edges = np.histogram(z, bins=edges)
    keep = np.flatnonzero(counts >= min_area * counts.max())
    return float(edges[keep[0]]), float(edges[keep[-1] + 1])


def _coarse(arr: np.ndarray, ref: sitk.Image, mm: float) -> sitk.Image:
    """Block-average to about ``mm`` voxels (anti-aliased, unlike plain resampling)."""
    factors = [max(1, int(round(mm / s))) for s in ref.GetSpacing()]
    return sitk.BinShrink(like(arr.astype(np.float32), ref), factors)


def initial_translation(fixed: sitk.Image, moving: sitk.Image, fixed_arr: np.ndarray, moving_arr: np.ndarray,
                        fixed_body: np.ndarray, moving_body: np.ndarray,
                        cfg: RegistrationConfig) -> np.ndarray:
    """Translation ``t`` (mm, world) such that fixed point ``x`` shows the anatomy of moving point ``x + t``.

    ``*_arr`` are the shifted intensities (air = 0), ``*_body`` the body masks (arrays in z, y, x).
    ``cfg.initialization``: ``"geometric_center"`` (image centres), ``"center_of_gravity"`` (body
    centres) or ``"search"``: for craniocaudal offsets ``tz`` every ``cfg.init_step_mm`` over all
    placements where the shorter scanned body length (:func:`body_z_range`) lies within the longer
    one (give or take a tenth of the shorter length), the in-plane shift aligns the centres of the
    body slabs that overlap at that ``tz``. Each candidate (and the centre-of-gravity one) is scored
    by NCC on ``cfg.init_coarse_mm`` block-averaged images, in the union of both bodies *within the
    common craniocaudal slab only* (outside it one scan has no data, or padding that looks like air,
    and scoring it would pull the shorter scan towards the widest part of the longer body), times
    the common length over the shorter length: NCC alone favours small overlaps that leave out
    whatever differs between two subjects (measured on phantom pairs: 45 mm off). The best
    candidate wins. Made for scans of the same body region (a site's atlases and targets); an
    empty body mask falls back to the image centres.
    """
    geometric = _image_centre(moving) - _image_centre(fixed)
    if cfg.initialization == "geometric_center" or not fixed_body.any() or not moving_body.any():
        return geometric
    pf, pm = world_points(fixed_body, fixed), world_points(moving_body, moving)
    cog = pm.mean(0) - pf.mean(0)
    if cfg.initialization == "center_of_gravity":
        return cog

    (f0, f1), (m0, m1) = body_z_range(fixed_body, fixed), body_z_range(moving_body, moving)
    short = min(f1 - f0, m1 - m0)

    def common(tz: float) -> tuple[float, float]:
        return max(f0, m0 - tz), min(f1, m1 - tz)

    def candidate(tz: float) -> np.ndarray | None:
        z_lo, z_hi = common(tz)
        sf = pf[(pf[:, 2] >= z_lo) & (pf[:, 2] <= z_hi)]
        sm = pm[(pm[:, 2] >= z_lo + tz) & (pm[:, 2] <= z_hi + tz)]
        return np.array([*(sm[:, :2].mean(0) - sf[:, :2].mean(0)), tz]) if len(sf) and len(sm) else None

    lo, hi = sorted((m0 - f0, m1 - f1))
    grid = np.arange(lo - 0.1 * short, hi + 0.1 * short + 1e-6, cfg.init_step_mm)
    candidates = [cog, *(c for c in map(candidate, grid) if c is not None)]

    fc = _coarse(fixed_arr, fixed, cfg.init_coarse_mm)
    mc = _coarse(moving_arr, moving, cfg.init_coarse_mm)
    mbc = _coarse(moving_body, moving, cfg.init_coarse_mm)
    fca = sitk.GetArrayFromImage(fc)
    fbody = sitk.GetArrayFromImage(_coarse(fixed_body, fixed, cfg.init_coarse_mm)) > 0.5
    fz = _world_z(fc)

    def score(t: np.ndarray) -> float:
        z_lo, z_hi = common(t[2])
        if z_hi - z_lo < 0.5 * short:
            return -np.inf
        tr = sitk.TranslationTransform(3, [float(v) for v in t])
        arr = sitk.GetArrayFromImage(sitk.Resample(mc, fc, tr, sitk.sitkLinear, _OUTSIDE, sitk.sitkFloat32))
        mbody = sitk.GetArrayFromImage(sitk.Resample(mbc, fc, tr, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
        m = (fbody | mbody) & (arr >= 0) & (fz >= z_lo) & (fz <= z_hi)
        return _ncc(fca, arr, m) * (z_hi - z_lo) / short

    def best() -> tuple[np.ndarray, float]:
        vals = np.array([-np.inf if np.isnan(v) else v for v in scores])
        return candidates[int(np.argmax(vals))], float(vals.max())

    scores = [score(t) for t in candidates]
    # Refine the craniocaudal offset below the grid step: half, then quarter steps either side.
    for step in (cfg.init_step_mm / 2, cfg.init_step_mm / 4):
        top = best()[0]
        for c in (candidate(top[2] - step), candidate(top[2] + step)):
            if c is not None:
                candidates.append(c)
                scores.append(score(c))
    top, value = best()
    return top if np.isfinite(value) else cog


# --------------------------------------------------------------------------------------------------
# elastix
# --------------------------------------------------------------------------------------------------

def parameter_object(cfg: RegistrationConfig, default_pixel_value: float = _OUTSIDE):
    """Elastix recipe shared by atlas propagation and synthesis: affine then B-spline, one metric,
    body masks. ``default_pixel_value`` fills outside the moving image's field of view."""
    import itk

    po = itk.ParameterObject.New()
    common = {
        "NumberOfResolutions": [str(cfg.resolutions)],
        "NumberOfSpatialSamples": [str(cfg.spatial_samples)],
        "RandomSeed": [str(cfg.seed)],
        "DefaultPixelValue": [f"{default_pixel_value:g}"],  # marks the warped atlas's field of view
        "WriteResultImage": ["false"],
        "ResultImagePixelType": ["float"],
        # Step sizes from the expected voxel displacement: as good here, and cheaper than the
        # default exact-gradient estimation at every resolution.
        "ASGDParameterEstimationMethod": ["DisplacementDistribution"],
        # Body masks: eroding them would drop the body outline, the strongest feature there is.
        "ErodeMask": ["false"],
        # The atlas arrives pre-translated (initial_translation); elastix's own initialisation
        # (centres of intensity mass) would undo that.
        "AutomaticTransformInitialization": ["false"],
    }
    affine = po.GetDefaultParameterMap("affine", cfg.resolutions)
    affine.update(common)
    affine["Metric"] = [cfg.metric]
    affine["MaximumNumberOfIterations"] = [str(cfg.affine_iterations)]
    bspline = po.GetDefaultParameterMap("bspline", cfg.resolutions, float(cfg.grid_spacing_mm))
    bspline.update(common)
    # One metric, no bending-energy penalty: with control points >= 20 mm apart the grid itself is
    # the regulariser, and the penalty costs 4-8x the metric per iteration (measured: 60 s vs 13 s
    # for a 48^3 pair, same Dice).
    bspline["Metric"] = [cfg.metric]
    bspline["Registration"] = ["MultiResolutionRegistration"]
    for k in ("Metric0Weight", "Metric1Weight"):
        bspline.pop(k, None)
    bspline["MaximumNumberOfIterations"] = [str(cfg.bspline_iterations)]
    bspline["FinalGridSpacingInPhysicalUnits"] = [f"{cfg.grid_spacing_mm:g}"]
    po.AddParameterMap(affine)
    po.AddParameterMap(bspline)
    return po


def _elastix_error(log_dir: Path, err: Exception) -> str:
    """The reason elastix states in its log (the exception itself only says "see the log")."""
    for log in log_dir.glob("*.log"):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
        for i, ln in enumerate(lines):
            if "Description:" in ln:
                return ln.split("Description:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else ln)
    text = str(err).strip()
    return text.splitlines()[-1] if text else "unknown reason"


def _displacement(transform_parameters, fixed: sitk.Image, grid_spacing_mm: float) -> sitk.Transform:
    """The registration's transform as a displacement field sampled every ``grid_spacing_mm / 4`` (at
    least the fixed voxel size) over the fixed scan's extent.

    Evaluating the B-spline at every voxel is what dominates warping (measured on 128^3: 2.1 s for
    elastix's result image plus 2.6 s for the label's transformix run, one thread); the deformation
    is smooth on the scale of its control-point spacing, so a field at a quarter of that spacing,
    linearly interpolated, warps the scan and the label in 0.8 s for both (OpenKBP pair: 99.99 % of
    the label's voxels as transformix warps them, organ Dice between the two 0.96-0.99, far below
    the registration's own error).
    """
    import itk

    spacing = np.maximum(np.asarray(fixed.GetSpacing()), grid_spacing_mm / 4.0)
    extent = (np.asarray(fixed.GetSize()) - 1) * np.asarray(fixed.GetSpacing())
    size = np.ceil(extent / spacing).astype(int) + 1  # covers the whole fixed grid
    params = itk.ParameterObject.New()
    for i in range(transform_parameters.GetNumberOfParameterMaps()):
        m = transform_parameters.GetParameterMap(i)
        m["Size"] = [str(int(n)) for n in size]
        m["Spacing"] = [f"{v:.10g}" for v in spacing]
        m["Origin"] = [f"{v:.10g}" for v in fixed.GetOrigin()]
        params.AddParameterMap(m)
    dummy = itk.image_from_array(np.zeros((2, 2, 2), np.float32))
    with tempfile.TemporaryDirectory(prefix="fadal_transformix_") as tmp:  # it writes deformationField.nii
        field = itk.transformix_deformation_field(dummy, params, log_to_console=False, output_directory=tmp)
    arr = np.asarray(itk.array_from_image(field), dtype=np.float64)
    if arr.shape[:3] != tuple(size[::-1]):
        raise RuntimeError(f"transformix returned a field of shape {arr.shape}, expected {tuple(size[::-1])}")
    disp = sitk.GetImageFromArray(arr, isVector=True)
    disp.SetSpacing(tuple(float(v) for v in spacing))
    disp.SetOrigin(fixed.GetOrigin())
    disp.SetDirection(fixed.GetDirection())
    return sitk.DisplacementFieldTransform(disp)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------

def register_atlas(fixed_image: Path, atlas_image: Path, atlas_label: Path, out_dir: Path,
                   cfg: RegistrationConfig) -> RegistrationResult:
    """Register ``atlas_image`` onto ``fixed_image`` and warp ``atlas_label`` and the atlas scan onto the fixed grid.

    Initial translation (:func:`initial_translation`), then affine and B-spline, both
    multi-resolution, with ``cfg``'s metric, iterations, spatial samples, control-point spacing and
    random seed, restricted to the body masks when ``cfg.use_body_masks``. Written atomically to
    ``out_dir``: the warped label ``<key>.nii.gz`` (uint8, exactly the fixed scan's grid), the warped
    atlas scan ``<key>_image.nii.gz`` (float32 HU, -1024 outside the atlas's field of view; weighted
    fusion needs it) and the result ``<key>.json`` (written last), where ``key`` is :func:`pair_key`.
    If all three exist, the stored result is returned with ``cached=True`` and nothing is
    registered. Whether the registration failed is decided by :func:`registration_failure`, not
    here. Raises :class:`RegistrationFailed` if elastix gives up. Uses ITK's global thread setting.
    """
    fixed_image, atlas_image, atlas_label, out_dir = map(Path, (fixed_image, atlas_image, atlas_label, out_dir))
    key = pair_key(fixed_image, atlas_image, atlas_label, cfg)
    hit = load_cached(key, out_dir, fixed_image, atlas_image, atlas_label)
    if hit is not None:
        return hit
    return _register_uncached(fixed_image, atlas_image, atlas_label, out_dir, cfg, key)


@dataclass
class PreparedPair:
    """A pair read, checked and placed by the initial translation: what every registration method starts from.

    ``origin`` is the atlas's origin moved by the initial translation ``t``; a transform that maps
    fixed world points into the atlas *as placed at* ``origin`` is all a method has to add
    (:func:`finish_pair` does the rest).
    """

    fixed_image: Path
    atlas_image: Path
    atlas_label: Path
    fixed: sitk.Image
    atlas: sitk.Image
    label: sitk.Image
    fixed_arr: np.ndarray  # shifted intensities (air = 0)
    atlas_arr: np.ndarray
    fixed_body: np.ndarray
    atlas_body: np.ndarray
    t: np.ndarray
    origin: np.ndarray
    metric_before: float
    metric_init: float
    expected: np.ndarray  # fixed voxels in the craniocaudal stretch the placed atlas covers
    slab_range: tuple[float, float]  # atlas body's world z range

    def slab(self, tz: float, margin: float = 0.0) -> np.ndarray:
        """Fixed voxels in the craniocaudal stretch where the atlas, placed by ``tz``, has body."""
        m0, m1 = self.slab_range
        fz = _world_z(self.fixed)
        return (fz >= m0 - tz - margin) & (fz <= m1 - tz + margin)


def prepare_pair(fixed_image: Path, atlas_image: Path, atlas_label: Path, cfg: RegistrationConfig) -> PreparedPair:
    """Read and check the three files, compute body masks and the initial translation (and the NCC before and after it)."""
    fixed = read_3d(fixed_image)
    atlas = read_3d(atlas_image)
    label = read_3d(atlas_label)
    diff = same_geometry(atlas, label)
    if diff is not None:
        raise FadalInputError(f"{atlas_label}: geometry differs from its image {atlas_image.name}: {diff}")
    lab_arr = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(lab_arr.dtype, np.floating) and not np.all(np.mod(lab_arr, 1) == 0):
        raise FadalInputError(f"{atlas_label}: label map has non-integer values; was it resampled linearly?")
    if lab_arr.min() < 0 or lab_arr.max() > 255:
        raise FadalInputError(f"{atlas_label}: label values must lie in [0, 255], got [{lab_arr.min()}, {lab_arr.max()}]")

    fixed_arr, atlas_arr = shifted(fixed), shifted(atlas)
    fixed_body = body_mask_array(fixed_arr + AIR_HU, axial_array_axis(fixed))
    atlas_body = body_mask_array(atlas_arr + AIR_HU, axial_array_axis(atlas))

    # Craniocaudal slab of the fixed scan where the atlas has body, for a placement tz of the atlas.
    fz = _world_z(fixed)
    m0, m1 = body_z_range(atlas_body, atlas) if atlas_body.any() else (-np.inf, np.inf)

    def slab(tz: float) -> np.ndarray:
        return (fz >= m0 - tz) & (fz <= m1 - tz)

    def ncc_in_fixed_body(atlas_origin, tz: float) -> float:
        moved = sitk.Resample(like(atlas_arr, atlas, atlas_origin), fixed, sitk.Transform(), sitk.sitkLinear,
                              _OUTSIDE, sitk.sitkFloat32)
        arr = sitk.GetArrayViewFromImage(moved)
        return _ncc(fixed_arr, arr, fixed_body & (arr >= 0) & slab(tz))

    metric_before = ncc_in_fixed_body(atlas.GetOrigin(), 0.0)
    t = initial_translation(fixed, atlas, fixed_arr, atlas_arr, fixed_body, atlas_body, cfg)
    origin = np.asarray(atlas.GetOrigin()) - t  # the atlas, moved by -t in world: x now shows old x + t
    return PreparedPair(
        fixed_image=fixed_image, atlas_image=atlas_image, atlas_label=atlas_label, fixed=fixed, atlas=atlas,
        label=label, fixed_arr=fixed_arr, atlas_arr=atlas_arr, fixed_body=fixed_body, atlas_body=atlas_body,
        t=t, origin=origin, metric_before=metric_before, metric_init=ncc_in_fixed_body(origin, t[2]),
        expected=slab(t[2]), slab_range=(m0, m1),
    )


def finish_pair(pair: PreparedPair, transform: sitk.Transform, out_dir: Path, cfg: RegistrationConfig, key: str,
                t0: float, recipe: str = RECIPE_VERSION, extra: dict | None = None) -> RegistrationResult:
    """Warp the atlas scan and label with ``transform`` (fixed world -> atlas placed at ``pair.origin``),
    measure the quality (module docstring), write the files atomically (json last) and return the result.
    ``t0``: when the pair's work began (``time.perf_counter()``); ``extra`` goes into the stored json."""
    fixed, atlas, label = pair.fixed, pair.atlas, pair.label
    warped_arr = sitk.GetArrayFromImage(sitk.Resample(like(pair.atlas_arr, atlas, pair.origin), fixed, transform,
                                                      sitk.sitkLinear, _OUTSIDE, sitk.sitkFloat32))
    covered = warped_arr >= 0
    warped_arr[~covered] = 0.0
    warped_body = body_mask_array(warped_arr + AIR_HU, axial_array_axis(fixed)) & covered
    # Quality inside the craniocaudal slab the warped atlas covers with body (see module docstring).
    fz = _world_z(fixed)
    if warped_body.any():
        w0, w1 = body_z_range(warped_body, fixed)
        view = covered & (fz >= w0) & (fz <= w1)
    else:
        view = np.zeros_like(covered)
    in_view = pair.fixed_body & view
    metric_after = _ncc(pair.fixed_arr, warped_arr, in_view)
    body_dice = _dice(in_view, warped_body & view) if in_view.any() else 0.0
    # Fraction of the fixed body the atlas was expected to cover (placed by the initial translation)
    # that it still covers: low when the registration squeezed or slid the atlas away.
    expected = pair.expected
    overlap = float((in_view & expected).sum() / max((pair.fixed_body & expected).sum(), 1))

    warped = sitk.Resample(like(sitk.GetArrayFromImage(label).astype(np.uint8), label, pair.origin), fixed,
                           transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    seconds = time.perf_counter() - t0

    nii = write_image(warped, out_dir / f"{key}.nii.gz", mode=PRIVATE)  # the cache: site-local state
    img = write_image(like(warped_arr + np.float32(AIR_HU), fixed), out_dir / f"{key}_image.nii.gz", mode=PRIVATE)
    res = RegistrationResult(
        fixed=pair.fixed_image, moving=pair.atlas_image, warped_label=nii, metric_before=pair.metric_before,
        metric_after=metric_after, seconds=round(seconds, 3), cached=False, atlas_label=pair.atlas_label, key=key,
        warped_image=img, metric_init=pair.metric_init, body_dice=body_dice, overlap=overlap,
        init_translation_mm=tuple(float(v) for v in pair.t),
    )
    stored = res.to_json()
    stored["config"] = cfg.model_dump(mode="json")
    stored["recipe"] = recipe
    stored.update(extra or {})
    write_json(stored, out_dir / f"{key}.json", mode=PRIVATE)
    return res


def _register_uncached(fixed_image: Path, atlas_image: Path, atlas_label: Path, out_dir: Path,
                       cfg: RegistrationConfig, key: str) -> RegistrationResult:
    _load_elastix()  # first use in a process loads ITK's elastix module (10-20 s): not this pair's time
    t0 = time.perf_counter()
    pair = prepare_pair(fixed_image, atlas_image, atlas_label, cfg)
    fixed, atlas, origin, t = pair.fixed, pair.atlas, pair.origin, pair.t

    import itk

    masks = {}
    if cfg.use_body_masks:
        # Fixed samples only where the atlas has body too: elsewhere they could only match air or padding.
        fixed_mask = _grow(pair.fixed_body, fixed, cfg.mask_margin_mm) & pair.slab(t[2], cfg.mask_margin_mm)
        masks = {"fixed_mask": _to_itk(fixed_mask.astype(np.uint8), fixed),
                 "moving_mask": _to_itk(_grow(pair.atlas_body, atlas, cfg.mask_margin_mm).astype(np.uint8), atlas,
                                        origin)}
    with tempfile.TemporaryDirectory(prefix="fadal_elastix_") as log_dir:
        try:
            _, transform_parameters = itk.elastix_registration_method(
                _to_itk(pair.fixed_arr, fixed), _to_itk(pair.atlas_arr, atlas, origin),
                parameter_object=parameter_object(cfg), log_to_console=False, log_to_file=True,
                output_directory=log_dir, **masks,
            )
        except RuntimeError as err:
            raise RegistrationFailed(
                f"registration of atlas {atlas_image} onto {fixed_image} failed in elastix "
                f"({_elastix_error(Path(log_dir), err)}); do the two scans overlap and show the same body region?"
            ) from err
    transform = _displacement(transform_parameters, fixed, cfg.grid_spacing_mm)
    return finish_pair(pair, transform, out_dir, cfg, key, t0)


def _init_worker() -> None:
    """One thread per worker: set before ITK/OpenMP start in this process."""
    for var in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    _load_elastix()


def _run_pair(fixed: Path, atlas: Path, label: Path, out_dir: Path, cfg_json: str, key: str) -> RegistrationResult:
    cfg = RegistrationConfig.model_validate_json(cfg_json)
    return _register_uncached(Path(fixed), Path(atlas), Path(label), Path(out_dir), cfg, key)


def register_many(pairs: list[tuple[Path, Path, Path]], out_dir: Path, cfg: RegistrationConfig,
                  progress: Callable[[RegistrationResult], None] | None = None,
                  errors: Literal["raise", "record"] = "raise") -> list[RegistrationResult]:
    """Register ``(fixed_image, atlas_image, atlas_label)`` pairs, ``cfg.workers`` at a time.

    Each worker is a fresh ('spawn') process with one ITK and one OpenMP thread; loading ITK's
    elastix module costs each worker 10-20 s once. With ``cfg.workers == 1`` the pairs run one after
    another in this process instead (no process to gain; the caller's ITK thread setting applies).
    Pairs already in the cache (and repeated pairs) start no process. ``progress`` is called in
    this process with each result as it becomes available (cached ones first). Results come back
    in the order of ``pairs``.
    If any pair fails, the others still run to the end (their results stay on disk, so a re-run
    only redoes the failed ones) and a :class:`FadalInputError` naming the files of every failed
    pair is raised. With ``errors="record"``, a pair on which elastix gave up
    (:class:`RegistrationFailed`: a bad atlas for that scan, not bad input) comes back as a result
    with ``error`` set and no files instead; other errors still raise.
    """
    out_dir = Path(out_dir)
    pairs = [tuple(Path(p) for p in pair) for pair in pairs]
    results: list[RegistrationResult | None] = [None] * len(pairs)
    todo: dict[str, list[int]] = {}
    for i, (fixed, atlas, label) in enumerate(pairs):
        key = pair_key(fixed, atlas, label, cfg)
        hit = load_cached(key, out_dir, fixed, atlas, label)
        if hit is not None:
            results[i] = hit
            if progress is not None:
                progress(hit)
        else:
            todo.setdefault(key, []).append(i)
    if not todo:
        return results  # type: ignore[return-value]

    failures: list[str] = []

    def _fail(idx: list[int], err: BaseException) -> None:
        fixed, atlas, label = pairs[idx[0]]
        if errors == "record" and isinstance(err, RegistrationFailed):
            for i in idx:
                results[i] = RegistrationResult(
                    fixed=pairs[i][0], moving=pairs[i][1], warped_label=None,  # type: ignore[arg-type]
                    metric_before=float("nan"), metric_after=float("nan"), seconds=0.0, cached=False,
                    atlas_label=pairs[i][2], error=str(err))
                if progress is not None:
                    progress(results[i])
            return
        failures.append(f"atlas {atlas} onto {fixed}: {type(err).__name__}: {err}")

    def _done(idx: list[int], res: RegistrationResult) -> None:
        for n, i in enumerate(idx):
            r = res if n == 0 else (load_cached(res.key, out_dir, *pairs[i]) or res)
            if n == 0:
                r.fixed, r.moving, r.atlas_label = pairs[i]
            results[i] = r
            if progress is not None:
                progress(r)

    if cfg.workers == 1:
        # No process to gain: run here, with the caller's ITK thread setting.
        for key, idx in todo.items():
            try:
                res = _register_uncached(*pairs[idx[0]], out_dir, cfg, key)
            except Exception as err:  # noqa: BLE001 - reported with the pair's files below
                _fail(idx, err)
                continue
            _done(idx, res)
    else:
        ctx = multiprocessing.get_context("spawn")
        cfg_json = cfg.model_dump_json()
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=ctx,
                                 initializer=_init_worker) as pool:
            futures = {}
            for key, idx in todo.items():
                fixed, atlas, label = pairs[idx[0]]
                futures[pool.submit(_run_pair, fixed, atlas, label, out_dir, cfg_json, key)] = idx
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as err:  # noqa: BLE001 - a dead worker (BrokenProcessPool) lands here too
                    _fail(futures[fut], err)
                    continue
                _done(futures[fut], res)
    if failures:
        raise FadalInputError(
            f"{len(failures)} of {len(pairs)} registrations failed (the others are cached in {out_dir}): "
            + "; ".join(failures)
        )
    return results  # type: ignore[return-value]
