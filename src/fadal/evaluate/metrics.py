"""Per-organ segmentation metrics (Dice, HD95, surface Dice) computed with MONAI on the reference grid.

Conventions (they matter when numbers are averaged and compared across sites):

* Metrics are computed on the reference image's voxel grid, with its spacing in mm; the prediction must share
  that grid exactly (:func:`fadal.data.io.same_geometry`), otherwise :class:`FadalInputError` is raised.
  Distances are physical: SimpleITK arrays are ``(z, y, x)`` while ``GetSpacing()`` is ``(x, y, z)``, so the
  spacing is reversed before it is handed to MONAI.
* Organ absent from the reference: the organ is **skipped** (no entry in the output), because Dice is undefined
  and a partially annotated reference must not penalise a prediction for organs nobody labelled.
* Organ present in the reference but absent from the prediction: ``dice = 0.0``, ``surface_dice = 0.0`` and
  ``hd95 = None`` (JSON ``null``: the distance is infinite). MONAI returns ``inf``/``nan`` there; no NaN or
  inf ever leaves this module.
* ``hd95`` is the symmetric 95th-percentile Hausdorff distance between the two surfaces (MONAI's definition:
  the larger of the two directed 95th percentiles), in mm. ``surface_dice`` is the normalised surface Dice
  (fraction of both surfaces within ``tolerance_mm`` of the other).
* Values are plain Python floats rounded to 6 decimals (MONAI computes HD95 in float32).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from fadal.data.io import same_geometry
from fadal.errors import FadalInputError

__all__ = ["organ_metrics", "summarize", "METRIC_NAMES"]

#: The metrics :func:`organ_metrics` returns for every scored organ, in this order.
METRIC_NAMES = ("dice", "hd95", "surface_dice")

BACKGROUND = "background"


def organ_metrics(
    pred: sitk.Image,
    ref: sitk.Image,
    labels: Mapping[str, int],
    organs: Collection[str] | None = None,
    tolerance_mm: float = 2.0,
) -> dict[str, dict[str, float | None]]:
    """Per organ: ``{"dice": .., "hd95": .. (mm), "surface_dice": .. (at tolerance_mm)}``.

    Computed on ``ref``'s grid with its spacing. ``labels`` is the ``dataset.json`` mapping name -> label value
    (``"background"`` is skipped); ``organs`` restricts which organs are scored (default: every non-background
    organ in ``labels``). Organs absent from ``ref`` are left out of the result; see the module docstring for the
    other conventions. The result keeps the order of ``labels``.
    """
    diff = same_geometry(ref, pred)
    if diff is not None:
        raise FadalInputError(
            f"prediction and reference are on different voxel grids: {diff} (reference vs prediction); "
            "resample the prediction onto the reference grid (nearest neighbour) before scoring"
        )
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise FadalInputError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    wanted = _organs_to_score(labels, organs)

    ref_arr = sitk.GetArrayViewFromImage(ref)
    pred_arr = sitk.GetArrayViewFromImage(pred)
    # numpy axis order is (z, y, x); SimpleITK spacing is (x, y, z).
    spacing = [float(s) for s in reversed(ref.GetSpacing())]

    out: dict[str, dict[str, float | None]] = {}
    for organ in wanted:
        value = labels[organ]
        r = ref_arr == value
        if not r.any():
            continue  # Dice undefined: organ not annotated in this reference.
        p = pred_arr == value
        if not p.any():
            out[organ] = {"dice": 0.0, "hd95": None, "surface_dice": 0.0}
            continue
        out[organ] = _binary_metrics(p, r, spacing, tolerance_mm)
    return out


def _organs_to_score(labels: Mapping[str, int], organs: Collection[str] | None) -> list[str]:
    names = [name for name in labels if name != BACKGROUND]
    if organs is None:
        return names
    unknown = sorted(set(organs) - set(names))
    if unknown:
        raise FadalInputError(f"unknown organ(s) {unknown}; dataset.json labels declare {names}")
    wanted = set(organs)
    return [name for name in names if name in wanted]


def _binary_metrics(p: np.ndarray, r: np.ndarray, spacing: list[float], tolerance_mm: float) -> dict[str, float | None]:
    """Metrics of one non-empty prediction mask ``p`` against one non-empty reference mask ``r``."""
    p, r = _crop_to_union(p, r)
    # MONAI wants one-hot, batch-first tensors: (batch=1, channel=1, *spatial).
    yp = torch.from_numpy(np.ascontiguousarray(p))[None, None].double()
    yr = torch.from_numpy(np.ascontiguousarray(r))[None, None].double()
    with warnings.catch_warnings():
        # Empty masks never get here; silence MONAI's generic warnings anyway so logs stay readable.
        warnings.simplefilter("ignore")
        dice = compute_dice(yp, yr, include_background=True)
        hd95 = compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(yp, yr, class_thresholds=[float(tolerance_mm)], include_background=True,
                                   spacing=spacing)
    return {"dice": _finite(dice), "hd95": _finite(hd95), "surface_dice": _finite(nsd)}


def _crop_to_union(p: np.ndarray, r: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their union's bounding box plus ``margin`` voxels (clipped to the image).

    Results are unchanged: Dice only counts foreground voxels, and surface distances are Euclidean distances
    between surface voxels, all inside the box; the margin keeps surface extraction identical (a mask touches
    the crop border only where it touches the image border). It saves MONAI converting whole CT volumes to
    float tensors for every organ.
    """
    union = p | r
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - margin, 0), int(idx[-1]) + 1 + margin))
    box = tuple(slices)
    return p[box], r[box]


def _finite(value: Any) -> float | None:
    """A MONAI 1x1 result as a plain float rounded to 6 decimals; ``None`` for inf/nan (no NaN reaches JSON).

    MONAI returns HD95 as float32; rounding drops the float32 noise (``0.800000011920929``) that would
    otherwise clutter JSON files while keeping far more precision than any metric has.
    """
    v = float(torch.as_tensor(value).reshape(-1)[0])
    return round(v, 6) if math.isfinite(v) else None


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Mean over cases per organ and metric, plus a ``"mean"`` pseudo-organ.

    ``per_case`` is ``{case_id: {organ: {metric: value}}}`` as returned by :func:`organ_metrics` per case.
    For each organ and metric the mean ignores ``None`` (and any non-finite value); it is ``None`` when no case
    has a value. Note that ignoring ``None`` makes the HD95 mean cover only cases where the organ was found.
    Each organ also gets ``"n"``: the number of cases in which that organ was scored (present in the case's
    dict). The ``"mean"`` pseudo-organ holds, per metric, the unweighted mean over organs of the per-organ
    means (``None`` where no organ has one), and ``"n"`` = the number of cases with at least one scored organ.
    A ``"mean"`` key inside a case's dict is ignored. Organs keep first-seen order; ``"mean"`` comes last.
    """
    values: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    metric_order: list[str] = []
    n_cases = 0
    for case in per_case.values():
        scored = False
        for organ, metrics in case.items():
            if organ == "mean":
                continue
            scored = True
            counts[organ] = counts.get(organ, 0) + 1
            organ_values = values.setdefault(organ, {})
            for metric, v in metrics.items():
                if metric == "n":
                    continue
                if metric not in metric_order:
                    metric_order.append(metric)
                bucket = organ_values.setdefault(metric, [])
                if v is not None and math.isfinite(float(v)):
                    bucket.append(float(v))
        n_cases += scored

    out: dict[str, dict[str, float | None]] = {}
    for organ, organ_values in values.items():
        row: dict[str, float | None] = {m: _mean(organ_values.get(m, [])) for m in metric_order}
        row["n"] = counts[organ]
        out[organ] = row
    if out:
        mean_row: dict[str, float | None] = {
            m: _mean([row[m] for row in out.values() if row.get(m) is not None]) for m in metric_order
        }
        mean_row["n"] = n_cases
        out["mean"] = mean_row
    return out


def _mean(xs: list[float | None]) -> float | None:
    return float(np.mean(xs)) if xs else None
