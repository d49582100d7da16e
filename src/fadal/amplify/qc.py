"""Quality control of pseudo-labels: which fused organs are plausible enough to train on.

Registration can succeed by its own measures and still hand over an organ that is wrong: a liver
that swallowed the stomach, a kidney in three pieces, a pancreas that vanished. Training on it would
teach the network the error with full conviction. Each fused organ of a scan is checked against what
the site's own labeled scans (the atlases) say that organ looks like:

* ``volume``: outside ``[min / f, max * f]`` of the volumes (ml) the atlases that drew it have
  (``f = QCConfig.volume_factor``);
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
from fadal.records import QCVerdict

#: A connected component holding at least this fraction of an organ counts as a real part of it.
SUBSTANTIAL_PART = 0.10
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass
class OrganReference:
    """What the atlases that drew an organ say about it."""

    volumes_ml: list[float] = field(default_factory=list)
    parts: int = 1  # most substantial connected components any atlas has


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
                    classes: Collection[int]) -> dict[int, OrganReference]:
    """Per organ in ``classes``: volumes (ml) and part count in the atlases that annotated it."""
    ref = {int(c): OrganReference() for c in classes}
    for path, drawn in zip(label_paths, annotated):
        img = read_image(path)
        arr = sitk.GetArrayViewFromImage(img)
        voxel_ml = float(np.prod(img.GetSpacing())) / 1000.0
        for c in ref:
            if c not in drawn:
                continue
            m = arr == c
            n = int(m.sum())
            if n == 0:
                continue  # drawn elsewhere, not in this scan's field of view: no evidence of size
            ref[c].volumes_ml.append(n * voxel_ml)
            sizes = _components(m)
            ref[c].parts = max(ref[c].parts, int((sizes >= SUBSTANTIAL_PART * n).sum()))
    return ref


def check_pseudo_label(label: np.ndarray, confidence: np.ndarray, voxel_ml: float, fused: Sequence[int],
                       reference: dict[int, OrganReference], names: dict[int, str], cfg: QCConfig) -> QCResult:
    """Flag each organ of ``fused`` in the pseudo-label and decide (rule: module docstring)."""
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
            if ref.volumes_ml:
                lo, hi = min(ref.volumes_ml) / cfg.volume_factor, max(ref.volumes_ml) * cfg.volume_factor
                info["volume_range_ml"] = [round(lo, 2), round(hi, 2)]
                if not lo <= n * voxel_ml <= hi:
                    info["flags"].append("volume")
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
