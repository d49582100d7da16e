"""Multi-atlas label fusion with a per-voxel confidence, aware of partial annotations.

Hospitals rarely draw every organ on every scan: one atlas may outline the liver and the spleen, the
next only the kidneys. In such an atlas a voxel labelled 0 means "not one of the organs I drew", not
"background": the atlas says nothing about the organs it did not annotate. Counting its 0 as a vote
against those organs would erase them wherever they were drawn by fewer than half of all atlases.
So each organ is voted on only by the atlases that annotated it (see :func:`majority_vote`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fadal.data.io import FadalInputError, read_image, resample_like, same_geometry

FUSION_METHODS = ("majority",)


def _annotated_sets(n_atlases: int, num_classes: int,
                    annotated: Sequence[Collection[int] | None] | None) -> list[set[int]]:
    everything = set(range(1, num_classes))
    if annotated is None:
        return [set(everything) for _ in range(n_atlases)]
    if len(annotated) != n_atlases:
        raise FadalInputError(f"annotated has {len(annotated)} entries for {n_atlases} atlases")
    out = []
    for i, a in enumerate(annotated):
        if a is None:
            out.append(set(everything))
            continue
        s = {int(c) for c in a}
        bad = sorted(c for c in s if not 1 <= c < num_classes)
        if bad:
            raise FadalInputError(f"atlas {i}: annotated classes {bad} outside 1..{num_classes - 1}")
        out.append(s)
    return out


def fused_classes(num_classes: int, annotated: Sequence[Collection[int] | None] | None,
                  n_atlases: int) -> list[int]:
    """Foreground classes that at least one atlas annotated, i.e. the ones fusion can produce."""
    sets = _annotated_sets(n_atlases, num_classes, annotated)
    return [c for c in range(1, num_classes) if any(c in s for s in sets)]


def majority_vote(labels: Sequence[np.ndarray], num_classes: int,
                  annotated: Sequence[Collection[int] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fuse atlas label maps (same shape, ints in ``[0, num_classes)``) into (label uint8, confidence float32).

    Rule. ``annotated[i]`` is the set of foreground class ids atlas ``i`` actually drew (``None``, or
    a ``None`` entry, means all of ``1..num_classes-1``). For each foreground class ``c`` only the
    atlases that annotated ``c`` vote on ``c``::

        p_c(x) = #{i annotating c : label_i(x) = c} / #{i annotating c}

    and ``p_c = 0`` for a class no atlas annotated (it cannot be fused; see :func:`fused_classes`).
    The candidate at ``x`` is ``w = argmax_{c >= 1} p_c(x)`` (ties go to the lowest id). The voxel
    gets ``w`` if ``p_w(x) > 0.5`` -- a strict majority of the atlases that know that organ --
    otherwise background. Confidence is ``p_w`` for a foreground voxel and ``1 - max_c p_c`` (the
    agreement that no organ is there) for a background voxel, so it lies in ``[0, 1]``, and 0.5
    marks a split vote either way.

    Why not count background votes: a 0 in an atlas that did not draw organ ``c`` means "unknown"
    for ``c``, not "background"; treating unknown as background would vote against organs wherever
    few atlases annotated them. A label value an atlas has for a class it did not declare as
    annotated is ignored (it counts as no vote), and with every atlas fully annotated the rule is
    the ordinary strict per-voxel majority among organs.

    Memory is O(voxels): classes are visited one at a time, keeping the running best.
    """
    if len(labels) == 0:
        raise FadalInputError("majority_vote needs at least one atlas label map")
    if num_classes < 1 or num_classes > 256:
        raise FadalInputError(f"num_classes must be in 1..256 (uint8 output), got {num_classes}")
    shape = np.shape(labels[0])
    arrays = []
    for i, lab in enumerate(labels):
        a = np.asarray(lab)
        if a.shape != shape:
            raise FadalInputError(f"atlas {i}: label shape {a.shape} differs from atlas 0's {shape}")
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise FadalInputError(f"atlas {i}: label values outside [0, {num_classes}) "
                                  f"(min {a.min()}, max {a.max()})")
        arrays.append(a)
    sets = _annotated_sets(len(arrays), num_classes, annotated)

    best_p = np.zeros(shape, dtype=np.float32)
    best_c = np.zeros(shape, dtype=np.uint8)
    count = np.zeros(shape, dtype=np.uint16)
    for c in range(1, num_classes):
        voters = [a for a, s in zip(arrays, sets) if c in s]
        if not voters:
            continue
        count[...] = 0
        for a in voters:
            count += a == c
        p = count.astype(np.float32) / np.float32(len(voters))
        better = p > best_p  # strict: ties keep the lower class id
        best_p[better] = p[better]
        best_c[better] = c
    foreground = best_p > 0.5
    label = np.where(foreground, best_c, 0).astype(np.uint8)
    confidence = np.where(foreground, best_p, 1.0 - best_p).astype(np.float32)
    return label, confidence


def fuse_files(label_paths: Sequence[Path], reference: sitk.Image, num_classes: int,
               annotated: Sequence[Collection[int] | None] | None = None,
               method: str = "majority") -> tuple[sitk.Image, sitk.Image]:
    """Fuse label files into (label uint8, confidence float32) images on ``reference``'s grid.

    Label maps not already on the reference grid are resampled onto it through world coordinates
    (nearest neighbour). ``annotated`` and the rule: see :func:`majority_vote`.
    """
    if method not in FUSION_METHODS:
        raise FadalInputError(f"unknown fusion method {method!r}; choose one of {list(FUSION_METHODS)}")
    arrays = []
    for p in label_paths:
        img = read_image(p)
        if same_geometry(img, reference) is not None:
            img = resample_like(img, reference, is_label=True)
        arr = sitk.GetArrayFromImage(img)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.mod(arr, 1) == 0):
                raise FadalInputError(f"{p}: label map has non-integer values")
            arr = arr.astype(np.int64)
        arrays.append(arr)
    label, confidence = majority_vote(arrays, num_classes, annotated)
    label_img = sitk.GetImageFromArray(label)
    label_img.CopyInformation(reference)
    conf_img = sitk.GetImageFromArray(confidence)
    conf_img.CopyInformation(reference)
    return label_img, conf_img
