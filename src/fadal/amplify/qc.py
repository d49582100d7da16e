"""Quality control of pseudo-labels: which fused organs are plausible enough to train on.

Registration can succeed by its own measures and still hand over an organ that is wrong: a liver
that swallowed the stomach, a kidney in three pieces, a pancreas that vanished. Training on it would
teach the network the error with full conviction. Each fused organ of a scan is checked against what
the site's own labeled scans (the atlases) say that organ looks like:

* ``volume``: outside ``[min / f, max * f]`` of the reference volumes (ml): those of the atlases that
  drew it, plus the federation's aggregated ``(smallest, largest)`` volume when given
  (``QCConfig.volume_ranges_ml``, e.g. :func:`volume_ranges` of the merged fingerprint). ``f =
  QCConfig.volume_factor`` is the stated prior of inter-patient spread for atlases alone (its default
  is measured on OpenKBP: with two atlases, ``f = 3`` keeps 96-100 % of other patients' organs inside,
  larynx 86 %; ``f = 1.5`` kept 62-91 %); with the federation's range, which already holds the measured
  spread, the smaller ``QCConfig.federation_volume_factor``;
* ``intensity``: its median HU differs by more than ``QCConfig.max_hu_difference`` from every
  atlas's median HU of that organ (when the scans are given): an organ placed on the wrong tissue
  (shifted onto air, fat or bone) changes its intensity, not its volume;
* ``fragmented``: its ``n`` largest 26-connected components hold less than
  ``QCConfig.min_component_fraction`` of its voxels, where ``n`` is the largest number of
  substantial components (>= 10 % of the organ) any atlas has for it (1 for most organs; 2 for a
  label that covers a pair, so a pair is not "fragmented");
* ``missing``: fused from atlases that drew it, yet absent from the pseudo-label;
* ``low_confidence``: mean fusion confidence over its voxels below ``QCConfig.min_confidence``.

Decision rule (:func:`check_pseudo_label`). With ``demote_flagged`` (default) a flagged organ becomes
*unknown* for that scan: its voxels get label 0 and confidence 0 (so the loss ignores them; label 0
alone would claim "no known organ here", which a demoted organ's voxels need not be) and it is left
out of ``organs_fused`` in the provenance, so training treats it like an organ nobody drew. The scan
is rejected (no label file; training skips it) when more than ``max_flagged_fraction`` of its fused
organs are flagged, or none is left. Without ``demote_flagged`` any flag rejects the scan.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fadal.config import QCConfig
from fadal.data.io import read_image
from fadal.records import Fingerprint, QCVerdict

#: A connected component holding at least this fraction of an organ counts as a real part of it.
SUBSTANTIAL_PART = 0.10
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass
class OrganReference:
    """What the atlases that drew an organ say about it."""

    volumes_ml: list[float] = field(default_factory=list)
    parts: int = 1  # most substantial connected components any atlas has
    median_hu: list[float] = field(default_factory=list)  # per atlas (when their scans were given)


def volume_ranges(fingerprint: Fingerprint) -> dict[str, tuple[float, float]]:
    """``QCConfig.volume_ranges_ml`` from a (merged) fingerprint: organ -> (smallest, largest) volume (ml)
    over the federation's labeled scans; a zero minimum (an organ drawn but outside a scan's field of
    view) says nothing about size and is left out."""
    return {o: (lo, hi) for o, (lo, hi) in fingerprint.organ_volume_ml.items() if lo > 0 and hi > 0}


@dataclass
class QCResult:
    """Decision for one pseudo-label. ``organs``: per organ name, its measures and flags."""

    accepted: bool
    reasons: list[str]
    organs: dict[str, dict]
    kept: list[int]
    demoted: list[int]

    def to_record(self, names: dict[int, str]) -> QCVerdict:
        """The decision as the provenance sidecar stores it (organs by name)."""
        return QCVerdict(accepted=self.accepted, reasons=self.reasons, organs=self.organs,
                         kept=[names.get(c, str(c)) for c in self.kept],
                         demoted=[names.get(c, str(c)) for c in self.demoted])


def _components(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected components of ``mask``, largest first."""
    lab, n = ndimage.label(mask, structure=_CONNECTIVITY)
    return np.sort(np.bincount(lab.ravel())[1:])[::-1] if n else np.zeros(0, dtype=np.int64)


def atlas_reference(label_paths: Sequence[Path], annotated: Sequence[Collection[int]],
                    classes: Collection[int], image_paths: Sequence[Path] | None = None) -> dict[int, OrganReference]:
    """Per organ in ``classes``: volumes (ml), part count and (with ``image_paths``, the atlas scans)
    median HU in the atlases that annotated it."""
    ref = {int(c): OrganReference() for c in classes}
    images = list(image_paths) if image_paths is not None else [None] * len(label_paths)
    for path, drawn, image in zip(label_paths, annotated, images):
        img = read_image(path)
        arr = sitk.GetArrayViewFromImage(img)
        hu = None if image is None else sitk.GetArrayFromImage(read_image(image))
        voxel_ml = float(np.prod(img.GetSpacing())) / 1000.0
        for c in ref:
            if c not in drawn:
                continue
            m = arr == c
            n = int(m.sum())
            if n == 0:
                continue  # drawn elsewhere, not in this scan's field of view: no evidence of size
            ref[c].volumes_ml.append(n * voxel_ml)
            if hu is not None and hu.shape == m.shape:
                ref[c].median_hu.append(float(np.median(hu[m])))
            sizes = _components(m)
            ref[c].parts = max(ref[c].parts, int((sizes >= SUBSTANTIAL_PART * n).sum()))
    return ref


def check_pseudo_label(label: np.ndarray, confidence: np.ndarray, voxel_ml: float, fused: Sequence[int],
                       reference: dict[int, OrganReference], names: dict[int, str], cfg: QCConfig,
                       image_hu: np.ndarray | None = None) -> QCResult:
    """Flag each organ of ``fused`` in the pseudo-label and decide (rule: module docstring). ``image_hu``:
    the scan (HU, on the label's grid), for the ``intensity`` check."""
    organs: dict[str, dict] = {}
    flagged: list[int] = []
    reasons: list[str] = []
    for c in fused:
        name = names.get(c, str(c))
        m = label == c
        n = int(m.sum())
        ref = reference.get(c, OrganReference())
        info: dict = {"volume_ml": round(n * voxel_ml, 2), "flags": []}
        if n == 0:
            info["flags"].append("missing")
        else:
            info["mean_confidence"] = round(float(confidence[m].mean()), 4)
            federation = list(cfg.volume_ranges_ml.get(name, ()))
            volumes = ref.volumes_ml + federation
            if volumes:
                f = cfg.federation_volume_factor if federation else cfg.volume_factor
                lo, hi = min(volumes) / f, max(volumes) * f
                info["volume_range_ml"] = [round(lo, 2), round(hi, 2)]
                if not lo <= n * voxel_ml <= hi:
                    info["flags"].append("volume")
            if image_hu is not None and ref.median_hu:
                info["median_hu"] = round(float(np.median(image_hu[m])), 1)
                info["hu_difference"] = round(min(abs(info["median_hu"] - h) for h in ref.median_hu), 1)
                if info["hu_difference"] > cfg.max_hu_difference:
                    info["flags"].append("intensity")
            sizes = _components(m)
            info["largest_parts_fraction"] = round(float(sizes[: ref.parts].sum() / n), 4)
            if info["largest_parts_fraction"] < cfg.min_component_fraction:
                info["flags"].append("fragmented")
            if info["mean_confidence"] < cfg.min_confidence:
                info["flags"].append("low_confidence")
        organs[name] = info
        if info["flags"]:
            flagged.append(c)
            reasons.append(f"{name}: {', '.join(_explain(f, info, cfg) for f in info['flags'])}")

    kept = [c for c in fused if c not in flagged]
    if not cfg.enabled:
        return QCResult(True, [], organs, list(fused), [])
    if not fused:
        return QCResult(False, ["no organ was fused"], organs, [], [])
    if flagged and not cfg.demote_flagged:
        return QCResult(False, reasons, organs, [], [])
    if not kept or len(flagged) / len(fused) > cfg.max_flagged_fraction:
        why = f"{len(flagged)} of {len(fused)} organs flagged (max_flagged_fraction {cfg.max_flagged_fraction:g})"
        return QCResult(False, [why, *reasons], organs, [], [])
    return QCResult(True, reasons, organs, kept, flagged)


def _explain(flag: str, info: dict, cfg: QCConfig) -> str:
    if flag == "volume":
        lo, hi = info["volume_range_ml"]
        return f"volume {info['volume_ml']:g} ml outside [{lo:g}, {hi:g}] ml"
    if flag == "fragmented":
        return f"largest component(s) hold {info['largest_parts_fraction']:.2f} < {cfg.min_component_fraction:g}"
    if flag == "intensity":
        return (f"median {info['median_hu']:g} HU is {info['hu_difference']:g} HU from every atlas's "
                f"(max_hu_difference {cfg.max_hu_difference:g})")
    if flag == "low_confidence":
        return f"mean confidence {info['mean_confidence']:.3f} < {cfg.min_confidence:g}"
    return "missing (fused from atlases that drew it, absent here)"


def demote(label: np.ndarray, confidence: np.ndarray, organs: Collection[int]) -> tuple[np.ndarray, np.ndarray]:
    """Make ``organs`` unknown: their voxels get label 0 and confidence 0 (copies)."""
    label, confidence = label.copy(), confidence.copy()
    for c in organs:
        m = label == c
        label[m] = 0
        confidence[m] = 0.0
    return label, confidence
