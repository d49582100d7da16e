"""Multi-atlas label fusion with a per-voxel confidence, aware of partial annotations.

Hospitals rarely draw every organ on every scan: one atlas may outline the liver and the spleen, the
next only the kidneys. In such an atlas a voxel labelled 0 means "not one of the organs I drew", not
"background": the atlas says nothing about the organs it did not annotate. Counting its 0 as a vote
against those organs would erase them wherever they were drawn by fewer than half of all atlases.
So every method below estimates, for each organ ``c`` separately, a probability ``p_c(x)`` from the
atlases that annotated ``c`` only, and all share one decision rule (:func:`_decide`):

* ``"majority"`` (:func:`majority_vote`): the fraction of those atlases that say ``c``.
* ``"weighted"`` (:func:`weighted_vote`, locally weighted voting after Artaechevarria et al., IEEE
  TMI 2009, and Sabuncu et al., IEEE TMI 2010): each atlas's vote is weighted per voxel by how well
  its warped scan matches the target scan around that voxel, ``w_i(x) = exp(-LMSD_i(x) / (2
  sigma^2))`` with ``LMSD_i`` the Gaussian-windowed mean squared HU difference (:func:`local_log_weights`).
  A badly registered atlas looks unlike the target where it is wrong, so it loses its say there.
* ``"staple"`` (:func:`staple_fusion`): binary STAPLE (Warfield et al., IEEE TMI 2004; SimpleITK's
  ``STAPLEImageFilter``) per organ over the atlases that annotated it; ``p_c`` is STAPLE's posterior
  probability of ``c``. SimpleITK's multi-label STAPLE is not used: it reads every 0 as a vote for
  background, which is exactly what a partial annotation must not do.
* ``"joint"`` (:func:`joint_vote`, joint label fusion after Wang et al., IEEE TPAMI 2013): locally
  weighted voting whose weights account for atlases that err together (:mod:`fadal.amplify.joint_fusion`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fadal.amplify.joint_fusion import joint_weights
from fadal.data.io import read_image, resample_like, same_geometry
from fadal.errors import FadalInputError

FUSION_METHODS = ("majority", "weighted", "staple", "joint")
#: HU range compared by the local weights: beyond it (dense bone, metal, air) differences say little.
_HU_RANGE = (-1000.0, 1500.0)
#: STAPLE runs in the union of the organ's votes grown by this many voxels (see :func:`staple_fusion`).
_STAPLE_MARGIN = 3


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


def _check_labels(labels: Sequence[np.ndarray], num_classes: int) -> list[np.ndarray]:
    if len(labels) == 0:
        raise FadalInputError("fusion needs at least one atlas label map")
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
    return arrays


def _decide(shape: tuple[int, ...], probabilities: Iterable[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The shared rule: ``w = argmax_c p_c`` (ties: lowest id); ``w`` if ``p_w > 0.5`` else background.

    Confidence is ``p_w`` for a foreground voxel and ``1 - max_c p_c`` (the agreement that no organ is
    there) for a background voxel, so it lies in ``[0, 1]`` and 0.5 marks a split decision either way.
    Memory is O(voxels): classes arrive one at a time and only the running best is kept.
    """
    best_p = np.zeros(shape, dtype=np.float32)
    best_c = np.zeros(shape, dtype=np.uint8)
    for c, p in probabilities:
        better = p > best_p  # strict: ties keep the lower class id
        best_p[better] = p[better]
        best_c[better] = c
    foreground = best_p > 0.5
    label = np.where(foreground, best_c, 0).astype(np.uint8)
    confidence = np.where(foreground, best_p, 1.0 - best_p).astype(np.float32)
    return label, confidence


def majority_vote(labels: Sequence[np.ndarray], num_classes: int,
                  annotated: Sequence[Collection[int] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fuse atlas label maps (same shape, ints in ``[0, num_classes)``) into (label uint8, confidence float32).

    Rule. ``annotated[i]`` is the set of foreground class ids atlas ``i`` actually drew (``None``, or
    a ``None`` entry, means all of ``1..num_classes-1``). For each foreground class ``c`` only the
    atlases that annotated ``c`` vote on ``c``::

        p_c(x) = #{i annotating c : label_i(x) = c} / #{i annotating c}

    and ``p_c = 0`` for a class no atlas annotated (it cannot be fused; see :func:`fused_classes`).
    Then :func:`_decide`: the voxel gets the best organ if a strict majority of the atlases that know
    that organ say so, otherwise background.

    A label value an atlas has for a class it did not declare as annotated is ignored (it counts as
    no vote), and with every atlas fully annotated the rule is the ordinary strict per-voxel majority
    among organs.
    """
    arrays = _check_labels(labels, num_classes)
    sets = _annotated_sets(len(arrays), num_classes, annotated)

    def probabilities():
        count = np.zeros(arrays[0].shape, dtype=np.uint16)
        for c in range(1, num_classes):
            voters = [a for a, s in zip(arrays, sets) if c in s]
            if voters:
                count[...] = 0
                for a in voters:
                    count += a == c
                yield c, count.astype(np.float32) / np.float32(len(voters))

    return _decide(arrays[0].shape, probabilities())


def local_log_weights(target_hu: np.ndarray, atlas_hu: Sequence[np.ndarray], spacing_zyx: Sequence[float],
                      sigma_hu: float = 30.0, radius_mm: float = 4.0) -> list[np.ndarray]:
    """``log w_i(x) = -LMSD_i(x) / (2 sigma_hu^2)`` for each warped atlas scan (all on the target's grid).

    ``LMSD_i`` is the squared HU difference (both clipped to [-1000, 1500]) averaged with a Gaussian
    of ``radius_mm`` (sigma, per axis in voxels from ``spacing_zyx``): local, so an atlas that is
    right in one organ and wrong in the next keeps its vote where it is right. Logs, because the
    weights themselves underflow where every atlas differs a lot.
    """
    t = np.clip(np.asarray(target_hu, dtype=np.float32), *_HU_RANGE)
    sigma_vox = [radius_mm / float(s) for s in spacing_zyx]
    out = []
    for a in atlas_hu:
        d = np.clip(np.asarray(a, dtype=np.float32), *_HU_RANGE) - t
        lmsd = ndimage.gaussian_filter(d * d, sigma_vox, mode="nearest")
        out.append((-lmsd / np.float32(2.0 * sigma_hu ** 2)).astype(np.float32))
    return out


def weighted_vote(labels: Sequence[np.ndarray], log_weights: Sequence[np.ndarray], num_classes: int,
                  annotated: Sequence[Collection[int] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Locally weighted voting: like :func:`majority_vote`, with per-voxel atlas weights.

    ``p_c(x) = sum_{i annotating c} w_i(x) [label_i(x) = c] / sum_{i annotating c} w_i(x)`` with
    ``w_i = exp(log_weights[i])`` (e.g. from :func:`local_log_weights`), then :func:`_decide`.
    Weights are normalised per voxel among the atlases that annotated ``c``, so an atlas that did not
    draw ``c`` neither votes on it nor dilutes it; equal weights give exactly the majority rule.
    """
    arrays = _check_labels(labels, num_classes)
    if len(log_weights) != len(arrays):
        raise FadalInputError(f"{len(log_weights)} weight maps for {len(arrays)} atlases")
    for i, w in enumerate(log_weights):
        if np.shape(w) != arrays[0].shape:
            raise FadalInputError(f"atlas {i}: weight map shape {np.shape(w)} differs from the labels' "
                                  f"{arrays[0].shape}")
    sets = _annotated_sets(len(arrays), num_classes, annotated)

    def probabilities():
        for c in range(1, num_classes):
            idx = [i for i, s in enumerate(sets) if c in s]
            if not idx:
                continue
            top = np.max([log_weights[i] for i in idx], axis=0)  # the best voter gets weight 1: no underflow
            num = np.zeros(arrays[0].shape, dtype=np.float32)
            den = np.zeros(arrays[0].shape, dtype=np.float32)
            for i in idx:
                w = np.exp(log_weights[i] - top)
                den += w
                num += np.where(arrays[i] == c, w, np.float32(0))
            yield c, num / den

    return _decide(arrays[0].shape, probabilities())


def joint_vote(labels: Sequence[np.ndarray], target_hu: np.ndarray, atlas_hu: Sequence[np.ndarray],
               spacing_zyx: Sequence[float], num_classes: int,
               annotated: Sequence[Collection[int] | None] | None = None, radius_mm: float = 5.0,
               sigma_hu: float = 30.0, alpha: float = 0.1, beta: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Joint label fusion (:mod:`fadal.amplify.joint_fusion`): like :func:`weighted_vote`, with weights
    that account for atlases erring together. For each organ ``c`` the atlases that annotated it get
    joint weights among themselves (solved once per such set of atlases, where their labels differ);
    ``p_c(x) = clip(sum_i w_i(x) [label_i(x) = c], 0, 1)`` (weights may be negative), then :func:`_decide`.
    """
    arrays = _check_labels(labels, num_classes)
    if len(atlas_hu) != len(arrays):
        raise FadalInputError(f"{len(atlas_hu)} warped atlas scans for {len(arrays)} atlases")
    for i, a in enumerate([target_hu, *atlas_hu]):
        if np.shape(a) != arrays[0].shape:
            raise FadalInputError(f"{'target' if i == 0 else f'atlas {i - 1}'}: scan shape {np.shape(a)} "
                                  f"differs from the labels' {arrays[0].shape}")
    sets = _annotated_sets(len(arrays), num_classes, annotated)
    solved: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def weights(idx: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if idx not in solved:
            differ = np.zeros(arrays[0].shape, dtype=bool)
            for i in idx[1:]:
                differ |= arrays[i] != arrays[idx[0]]
            solved[idx] = differ, joint_weights(target_hu, [atlas_hu[i] for i in idx], differ, spacing_zyx,
                                                radius_mm, sigma_hu, alpha, beta)
        return solved[idx]

    def probabilities():
        for c in range(1, num_classes):
            idx = tuple(i for i, s in enumerate(sets) if c in s)
            if not idx:
                continue
            differ, w = weights(idx)
            p = (arrays[idx[0]] == c).astype(np.float32)
            votes = np.stack([arrays[i][differ] == c for i in idx])
            p[differ] = np.clip((w * votes).sum(axis=0), 0.0, 1.0)
            yield c, p

    return _decide(arrays[0].shape, probabilities())


def staple_fusion(labels: Sequence[np.ndarray], num_classes: int,
                  annotated: Sequence[Collection[int] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-organ binary STAPLE over the atlases that annotated the organ, then :func:`_decide`.

    For each organ ``c``, STAPLE (EM over each atlas's sensitivity and specificity) runs on the
    binary maps ``label_i == c`` of the atlases that annotated ``c``, inside the bounding box of
    their union grown by a few voxels; ``p_c`` is its posterior probability there and 0 outside.
    The box keeps it fast, and keeps the miles of background that every atlas agrees on from
    inflating every specificity to 1 (which would make STAPLE a plain vote). One voter: ``p_c`` is
    its own map. The confidence map is thus the STAPLE posterior of the chosen organ (foreground) or
    one minus the highest organ posterior (background).
    """
    arrays = _check_labels(labels, num_classes)
    sets = _annotated_sets(len(arrays), num_classes, annotated)
    shape = arrays[0].shape

    def probabilities():
        for c in range(1, num_classes):
            masks = [(a == c) for a, s in zip(arrays, sets) if c in s]
            if not masks:
                continue
            union = np.logical_or.reduce(masks)
            p = np.zeros(shape, dtype=np.float32)
            if union.any():
                box = tuple(slice(max(int(lo) - _STAPLE_MARGIN, 0), int(hi) + _STAPLE_MARGIN + 1)
                            for lo, hi in zip(np.argwhere(union).min(0), np.argwhere(union).max(0)))
                if len(masks) == 1:
                    p[box] = masks[0][box]
                else:
                    f = sitk.STAPLEImageFilter()
                    f.SetForegroundValue(1.0)
                    post = f.Execute([sitk.GetImageFromArray(m[box].astype(np.uint8)) for m in masks])
                    p[box] = np.nan_to_num(sitk.GetArrayFromImage(post), nan=0.0)
            yield c, p

    return _decide(shape, probabilities())


def _read_on(path: Path, reference: sitk.Image, is_label: bool) -> np.ndarray:
    img = read_image(path)
    if same_geometry(img, reference) is not None:
        img = resample_like(img, reference, is_label=is_label, default=0.0 if is_label else -1024.0)
    return sitk.GetArrayFromImage(img)


def fuse_files(label_paths: Sequence[Path], reference: sitk.Image, num_classes: int,
               annotated: Sequence[Collection[int] | None] | None = None,
               method: str = "majority", image_paths: Sequence[Path] | None = None,
               sigma_hu: float = 30.0, radius_mm: float = 4.0, joint: dict | None = None
               ) -> tuple[sitk.Image, sitk.Image]:
    """Fuse label files into (label uint8, confidence float32) images on ``reference``'s grid.

    Label maps not already on the reference grid are resampled onto it through world coordinates
    (nearest neighbour). ``method``: ``"majority"``, ``"weighted"`` (needs ``image_paths``, the
    warped atlas scans in HU, and ``reference`` must be the target scan itself; ``sigma_hu`` and
    ``radius_mm`` as in :func:`local_log_weights`), ``"staple"`` or ``"joint"`` (needs ``image_paths``
    like ``"weighted"``; ``joint``: keyword arguments of :func:`joint_vote`, e.g. ``alpha``, ``beta``,
    ``radius_mm``, ``sigma_hu``). ``annotated``: see :func:`majority_vote`.
    """
    if method not in FUSION_METHODS:
        raise FadalInputError(f"unknown fusion method {method!r}; choose one of {list(FUSION_METHODS)}")
    arrays = []
    for p in label_paths:
        arr = _read_on(p, reference, is_label=True)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.mod(arr, 1) == 0):
                raise FadalInputError(f"{p}: label map has non-integer values")
            arr = arr.astype(np.int64)
        arrays.append(arr)
    if method == "majority":
        label, confidence = majority_vote(arrays, num_classes, annotated)
    elif method == "staple":
        label, confidence = staple_fusion(arrays, num_classes, annotated)
    else:
        if image_paths is None or len(image_paths) != len(label_paths):
            raise FadalInputError(f"{method} fusion needs one warped atlas scan per label map (image_paths)")
        target = sitk.GetArrayFromImage(reference).astype(np.float32)
        atlas_hu = [_read_on(p, reference, is_label=False) for p in image_paths]
        spacing_zyx = reference.GetSpacing()[::-1]
        if method == "joint":
            label, confidence = joint_vote(arrays, target, atlas_hu, spacing_zyx, num_classes, annotated,
                                           **(joint or {}))
        else:
            log_w = local_log_weights(target, atlas_hu, spacing_zyx, sigma_hu, radius_mm)
            label, confidence = weighted_vote(arrays, log_w, num_classes, annotated)
    label_img = sitk.GetImageFromArray(label)
    label_img.CopyInformation(reference)
    conf_img = sitk.GetImageFromArray(confidence)
    conf_img.CopyInformation(reference)
    return label_img, conf_img
