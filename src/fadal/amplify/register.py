"""Atlas registration: prepare a pair, register it (elastix), warp and measure, many pairs in worker processes.

One *pair* is (fixed scan, atlas scan, atlas label). :func:`register_atlas` aligns the atlas scan to
the fixed scan in physical space (grids, spacings and orientations may differ), warps the atlas label
and the atlas scan onto the fixed scan's voxel grid, and caches the result under a content hash of
the inputs and the configuration (:mod:`fadal.amplify.cache`), so re-running an amplification never
registers the same pair twice. :func:`register_many` runs many pairs in worker processes, one ITK
thread each (on a small machine, several single-threaded registrations beat one multi-threaded one,
and a crash in elastix only takes down its worker).

Every pair starts from :func:`prepare_pair` (read and
check the files, body masks, the initial translation: :mod:`fadal.amplify.geometry`,
:mod:`fadal.amplify.initialize`) and ends in :func:`finish_pair` (warp, measure the quality that
:func:`fadal.amplify.result.registration_failure` judges, store). The fixed mask is limited to the
craniocaudal stretch the atlas covers (elsewhere fixed samples could only match air), and the
similarity measures are taken inside the common stretch. ``registration.method: convexadam`` runs
:func:`fadal.amplify.convexadam.register_pair` between the two, with the same cache and record.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from fadal.amplify import convexadam
from fadal.amplify.cache import entry_paths, load_cached, pair_key, store
from fadal.amplify.elastix import (RECIPE_VERSION, RegistrationFailed, displacement_transform, load_elastix,
                                   run_elastix)
from fadal.amplify.geometry import (AIR_HU, OUTSIDE, axial_array_axis, body_mask_array, body_z_range, dice, grow,
                                    in_slab, like, ncc, read_3d, shifted)
from fadal.amplify.initialize import initial_translation
from fadal.amplify.result import RegistrationResult
from fadal.config import RegistrationConfig
from fadal.data.io import same_geometry
from fadal.errors import FadalInputError

Pair = tuple[Path, Path, Path]


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
        return in_slab(self.fixed, self.slab_range, tz, margin)


def _read_checked(fixed_image: Path, atlas_image: Path, atlas_label: Path) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """The three volumes, with the atlas label checked against its image: a clear error naming the file."""
    fixed, atlas, label = read_3d(fixed_image), read_3d(atlas_image), read_3d(atlas_label)
    diff = same_geometry(atlas, label)
    if diff is not None:
        raise FadalInputError(f"{atlas_label}: geometry differs from its image {atlas_image.name}: {diff}")
    lab_arr = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(lab_arr.dtype, np.floating) and not np.all(np.mod(lab_arr, 1) == 0):
        raise FadalInputError(f"{atlas_label}: label map has non-integer values; was it resampled linearly?")
    if lab_arr.min() < 0 or lab_arr.max() > 255:
        raise FadalInputError(f"{atlas_label}: label values must lie in [0, 255], got [{lab_arr.min()}, {lab_arr.max()}]")
    return fixed, atlas, label


def prepare_pair(fixed_image: Path, atlas_image: Path, atlas_label: Path, cfg: RegistrationConfig) -> PreparedPair:
    """Read and check the three files, compute body masks and the initial translation (and the NCC before and after it)."""
    fixed, atlas, label = _read_checked(fixed_image, atlas_image, atlas_label)
    fixed_arr, atlas_arr = shifted(fixed), shifted(atlas)
    fixed_body = body_mask_array(fixed_arr + AIR_HU, axial_array_axis(fixed))
    atlas_body = body_mask_array(atlas_arr + AIR_HU, axial_array_axis(atlas))
    # Craniocaudal slab of the fixed scan where the atlas has body, for a placement tz of the atlas.
    z_range = body_z_range(atlas_body, atlas) if atlas_body.any() else (-np.inf, np.inf)

    def ncc_in_fixed_body(atlas_origin, tz: float) -> float:
        moved = sitk.Resample(like(atlas_arr, atlas, atlas_origin), fixed, sitk.Transform(), sitk.sitkLinear,
                              OUTSIDE, sitk.sitkFloat32)
        arr = sitk.GetArrayViewFromImage(moved)
        return ncc(fixed_arr, arr, fixed_body & (arr >= 0) & in_slab(fixed, z_range, tz))

    metric_before = ncc_in_fixed_body(atlas.GetOrigin(), 0.0)
    t = initial_translation(fixed, atlas, fixed_arr, atlas_arr, fixed_body, atlas_body, cfg)
    origin = np.asarray(atlas.GetOrigin()) - t  # the atlas, moved by -t in world: x now shows old x + t
    return PreparedPair(
        fixed_image=fixed_image, atlas_image=atlas_image, atlas_label=atlas_label, fixed=fixed, atlas=atlas,
        label=label, fixed_arr=fixed_arr, atlas_arr=atlas_arr, fixed_body=fixed_body, atlas_body=atlas_body,
        t=t, origin=origin, metric_before=metric_before, metric_init=ncc_in_fixed_body(origin, t[2]),
        expected=in_slab(fixed, z_range, t[2]), slab_range=z_range,
    )


def finish_pair(pair: PreparedPair, transform: sitk.Transform, out_dir: Path, cfg: RegistrationConfig, key: str,
                t0: float, recipe: str = RECIPE_VERSION, extra: dict | None = None) -> RegistrationResult:
    """Warp the atlas scan and label with ``transform`` (fixed world -> atlas placed at ``pair.origin``),
    measure the quality (:mod:`fadal.amplify.result`), store the entry (:func:`fadal.amplify.cache.store`)
    and return the result. ``t0``: when the pair's work began (``time.perf_counter()``); ``extra`` goes
    into the stored json."""
    fixed, atlas, label = pair.fixed, pair.atlas, pair.label
    warped_arr = sitk.GetArrayFromImage(sitk.Resample(like(pair.atlas_arr, atlas, pair.origin), fixed, transform,
                                                      sitk.sitkLinear, OUTSIDE, sitk.sitkFloat32))
    covered = warped_arr >= 0
    warped_arr[~covered] = 0.0
    warped_body = body_mask_array(warped_arr + AIR_HU, axial_array_axis(fixed)) & covered
    # Quality inside the craniocaudal slab the warped atlas covers with body (see the module docstring).
    view = covered & in_slab(fixed, body_z_range(warped_body, fixed)) if warped_body.any() else np.zeros_like(covered)
    in_view = pair.fixed_body & view
    metric_after = ncc(pair.fixed_arr, warped_arr, in_view)
    body_dice = dice(in_view, warped_body & view) if in_view.any() else 0.0
    # Fraction of the fixed body the atlas was expected to cover (placed by the initial translation)
    # that it still covers: low when the registration squeezed or slid the atlas away.
    expected = pair.expected
    overlap = float((in_view & expected).sum() / max((pair.fixed_body & expected).sum(), 1))

    warped = sitk.Resample(like(sitk.GetArrayFromImage(label).astype(np.uint8), label, pair.origin), fixed,
                           transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    seconds = time.perf_counter() - t0
    _, nii, img = entry_paths(key, out_dir)
    res = RegistrationResult(
        fixed=pair.fixed_image, moving=pair.atlas_image, warped_label=nii, metric_before=pair.metric_before,
        metric_after=metric_after, seconds=round(seconds, 3), cached=False, atlas_label=pair.atlas_label, key=key,
        warped_image=img, metric_init=pair.metric_init, body_dice=body_dice, overlap=overlap,
        init_translation_mm=tuple(float(v) for v in pair.t),
    )
    metadata = {"config": cfg.model_dump(mode="json"), "recipe": recipe, **(extra or {})}
    return store(res, warped, like(warped_arr + np.float32(AIR_HU), fixed), out_dir, metadata)


def _register_uncached(fixed_image: Path, atlas_image: Path, atlas_label: Path, out_dir: Path,
                       cfg: RegistrationConfig, key: str) -> RegistrationResult:
    """Register one pair with ``cfg.method`` (elastix here, or ConvexAdam) and store it under ``key``."""
    if cfg.method == "convexadam":
        t0 = time.perf_counter()
        pair = prepare_pair(fixed_image, atlas_image, atlas_label, cfg)
        transform, extra = convexadam.register_pair(pair, cfg)
        return finish_pair(pair, transform, out_dir, cfg, key, t0, recipe=convexadam.RECIPE, extra=extra)
    load_elastix()  # first use in a process loads ITK's elastix module (10-20 s): not this pair's time
    t0 = time.perf_counter()
    pair = prepare_pair(fixed_image, atlas_image, atlas_label, cfg)
    masks = None
    if cfg.use_body_masks:
        # Fixed samples only where the atlas has body too: elsewhere they could only match air or padding.
        margin = cfg.mask_margin_mm
        masks = (grow(pair.fixed_body, pair.fixed, margin) & pair.slab(pair.t[2], margin),
                 grow(pair.atlas_body, pair.atlas, margin))
    params = run_elastix(pair.fixed, pair.fixed_arr, pair.atlas, pair.atlas_arr, pair.origin, cfg, masks,
                         f"atlas {atlas_image} onto {fixed_image}")
    transform = displacement_transform(params, pair.fixed, cfg.grid_spacing_mm)
    return finish_pair(pair, transform, out_dir, cfg, key, t0)


# --------------------------------------------------------------------------------------------------
# many pairs
# --------------------------------------------------------------------------------------------------

def _init_worker() -> None:
    """One thread per worker: set before ITK/OpenMP start in this process."""
    for var in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    load_elastix()


def _run_pair(fixed: Path, atlas: Path, label: Path, out_dir: Path, cfg_json: str, key: str) -> RegistrationResult:
    cfg = RegistrationConfig.model_validate_json(cfg_json)
    return _register_uncached(Path(fixed), Path(atlas), Path(label), Path(out_dir), cfg, key)


@dataclass
class _Batch:
    """One :func:`register_many` call: results in the order of ``pairs``, and the failures to report."""

    pairs: list[Pair]
    out_dir: Path
    progress: Callable[[RegistrationResult], None] | None
    errors: Literal["raise", "record"]
    results: list[RegistrationResult | None] = field(init=False)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.pairs)

    def _report(self, i: int, res: RegistrationResult) -> None:
        self.results[i] = res
        if self.progress is not None:
            self.progress(res)

    def look_up(self, cfg: RegistrationConfig) -> dict[str, list[int]]:
        """Report the cached pairs; return the others by key (a repeated pair is registered once)."""
        todo: dict[str, list[int]] = {}
        for i, (fixed, atlas, label) in enumerate(self.pairs):
            key = pair_key(fixed, atlas, label, cfg)
            hit = load_cached(key, self.out_dir, fixed, atlas, label)
            if hit is not None:
                self._report(i, hit)
            else:
                todo.setdefault(key, []).append(i)
        return todo

    def done(self, idx: list[int], res: RegistrationResult) -> None:
        """``res`` registered the pairs ``idx`` (repeats of the first read the entry it wrote)."""
        for n, i in enumerate(idx):
            r = res if n == 0 else (load_cached(res.key, self.out_dir, *self.pairs[i]) or res)
            if n == 0:
                r.fixed, r.moving, r.atlas_label = self.pairs[i]
            self._report(i, r)

    def failed(self, idx: list[int], err: BaseException) -> None:
        """Record a failed atlas (``errors="record"`` and elastix gave up), or keep the error to raise."""
        if self.errors == "record" and isinstance(err, RegistrationFailed):
            for i in idx:
                fixed, atlas, label = self.pairs[i]
                self._report(i, RegistrationResult(
                    fixed=fixed, moving=atlas, warped_label=None,  # type: ignore[arg-type]
                    metric_before=float("nan"), metric_after=float("nan"), seconds=0.0, cached=False,
                    atlas_label=label, error=str(err)))
            return
        fixed, atlas, _ = self.pairs[idx[0]]
        self.failures.append(f"atlas {atlas} onto {fixed}: {type(err).__name__}: {err}")

    def raise_failures(self) -> None:
        if self.failures:
            raise FadalInputError(
                f"{len(self.failures)} of {len(self.pairs)} registrations failed (the others are cached in "
                f"{self.out_dir}): " + "; ".join(self.failures)
            )


def _run_here(batch: _Batch, todo: dict[str, list[int]], cfg: RegistrationConfig) -> None:
    """No process to gain: register one pair after another here, with the caller's ITK thread setting."""
    for key, idx in todo.items():
        try:
            res = _register_uncached(*batch.pairs[idx[0]], batch.out_dir, cfg, key)
        except Exception as err:  # noqa: BLE001 - reported with the pair's files
            batch.failed(idx, err)
            continue
        batch.done(idx, res)


def _run_in_pool(batch: _Batch, todo: dict[str, list[int]], cfg: RegistrationConfig) -> None:
    """Register in ``cfg.workers`` fresh ('spawn') single-threaded processes, results as they come."""
    cfg_json = cfg.model_dump_json()
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker) as pool:
        futures = {pool.submit(_run_pair, *batch.pairs[idx[0]], batch.out_dir, cfg_json, key): idx
                   for key, idx in todo.items()}
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except Exception as err:  # noqa: BLE001 - a dead worker (BrokenProcessPool) lands here too
                batch.failed(futures[fut], err)
                continue
            batch.done(futures[fut], res)


def register_many(pairs: list[Pair], out_dir: Path, cfg: RegistrationConfig,
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
    batch = _Batch([tuple(Path(p) for p in pair) for pair in pairs], Path(out_dir), progress, errors)
    todo = batch.look_up(cfg)
    if todo:
        (_run_here if cfg.workers == 1 else _run_in_pool)(batch, todo, cfg)
    batch.raise_failures()
    return batch.results  # type: ignore[return-value]
