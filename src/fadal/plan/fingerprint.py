"""A site's dataset fingerprint: the aggregate statistics the planner needs, and their merge.

Measured in the canonical orientation the network sees (RAS axes), so that "the third spacing" means
the craniocaudal one whatever the file's direction matrix says.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from fadal.data.io import read_image
from fadal.data.site import Site
from fadal.records import Fingerprint, IntensityStats, Percentiles

#: Voxels of drawn organs sampled per labeled scan for the HU statistics (bounded memory and time).
HU_SAMPLES_PER_SCAN = 20_000


def world_axes(image: sitk.Image) -> list[int]:
    """For each image axis, the world axis (0 x, 1 y, 2 z) it runs along most."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return [int(np.argmax(np.abs(direction[:, i]))) for i in range(3)]


def per_world_axis(values: Sequence[float], image: sitk.Image) -> np.ndarray:
    out = np.zeros(3)
    for i, axis in enumerate(world_axes(image)):
        out[axis] = values[i]
    return out


def body_extent_mm(image: sitk.Image, threshold_hu: float) -> np.ndarray:
    """Extent (mm, per world axis) of the bounding box of the voxels above ``threshold_hu``."""
    arr = sitk.GetArrayViewFromImage(image)  # (z, y, x) = image axes reversed
    inside = np.argwhere(arr > threshold_hu)
    if inside.size == 0:
        extent_voxels = np.asarray(image.GetSize(), dtype=float)
    else:
        extent_voxels = (inside.max(0) - inside.min(0) + 1)[::-1].astype(float)
    return per_world_axis(extent_voxels * np.asarray(image.GetSpacing()), image)


def _percentiles(rows: list[np.ndarray]) -> Percentiles:
    a = np.asarray(rows, dtype=float)
    return Percentiles(**{f"p{q}": tuple(float(v) for v in np.percentile(a, q, axis=0)) for q in (10, 50, 90)})


def site_fingerprint(site: Site, body_threshold_hu: float = -500.0, seed: int = 0) -> Fingerprint:
    """Measure one site's scans (labeled, unlabeled and nothing held out: test cases stay unseen)."""
    rng = np.random.default_rng(seed)
    spacings, extents, hu_samples = [], [], []
    volumes: dict[str, list[float]] = {}
    names = {v: k for k, v in site.labels.items()}
    for case in site.labeled + site.unlabeled:
        image = read_image(case.image)
        spacings.append(per_world_axis(image.GetSpacing(), image))
        extents.append(body_extent_mm(image, body_threshold_hu))
        if case.label is None:
            continue
        label = sitk.GetArrayFromImage(read_image(case.label))
        hu = sitk.GetArrayViewFromImage(image)
        drawn = np.isin(label, [site.labels[o] for o in case.annotated]) & (label > 0)
        values = hu[drawn]
        if values.size:
            hu_samples.append(rng.choice(values, min(values.size, HU_SAMPLES_PER_SCAN), replace=False))
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        counts = np.bincount(label.ravel().astype(np.int64), minlength=max(names) + 1)
        for organ in case.annotated:
            volumes.setdefault(organ, []).append(float(counts[site.labels[organ]]) * voxel_ml)
    stats = None
    if hu_samples:
        pooled = np.concatenate(hu_samples).astype(float)
        stats = IntensityStats(p00_5=float(np.percentile(pooled, 0.5)), p50=float(np.percentile(pooled, 50)),
                               p99_5=float(np.percentile(pooled, 99.5)), mean=float(pooled.mean()),
                               std=float(pooled.std()))
    return Fingerprint(scans=len(spacings), labeled_scans=len(site.labeled), spacing_mm=_percentiles(spacings),
                       body_extent_mm=_percentiles(extents), foreground_hu=stats,
                       organ_volume_ml={o: (min(v), max(v)) for o, v in volumes.items()})


def _weighted(values: list[tuple[float, ...]], weights: list[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in np.average(np.asarray(values, dtype=float), axis=0, weights=weights))


def merge_fingerprints(prints: Sequence[Fingerprint]) -> Fingerprint:
    """One fingerprint for a federation: percentiles averaged with the sites' scan counts as weights (an
    approximation of the pooled percentiles that needs no per-case value), ranges as their union."""
    if not prints:
        raise ValueError("no fingerprints to merge")
    if len(prints) == 1:
        return prints[0]
    scans = [float(f.scans) for f in prints]

    def merged(attr: str) -> Percentiles:
        return Percentiles(**{q: _weighted([getattr(getattr(f, attr), q) for f in prints], scans)
                              for q in ("p10", "p50", "p90")})

    labeled = [f for f in prints if f.foreground_hu is not None]
    hu = None
    if labeled:
        w = [float(f.labeled_scans) or 1.0 for f in labeled]
        fields = ("p00_5", "p50", "p99_5", "mean", "std")
        hu = IntensityStats(**dict(zip(fields, _weighted([tuple(getattr(f.foreground_hu, k) for k in fields)
                                                          for f in labeled], w))))
    volumes: dict[str, tuple[float, float]] = {}
    for f in prints:
        for organ, (lo, hi) in f.organ_volume_ml.items():
            old = volumes.get(organ, (lo, hi))
            volumes[organ] = (min(old[0], lo), max(old[1], hi))
    return Fingerprint(sites=sum(f.sites for f in prints), scans=int(sum(scans)),
                       labeled_scans=sum(f.labeled_scans for f in prints), spacing_mm=merged("spacing_mm"),
                       body_extent_mm=merged("body_extent_mm"), foreground_hu=hu, organ_volume_ml=volumes)
