"""What training sees: the site's training items, cached whole volumes, and patches drawn from them.

A patch is centred, with probability ``foreground_fraction``, on a voxel of one organ *drawn in that
case*, the organ chosen uniformly among them (``balance="case"``: the esophagus as often as the
mandible where both are drawn), or uniformly among every organ any case drew, then a case that drew it
(``balance="dataset"``: an organ drawn in a third of the cases as often as one drawn in all); otherwise
anywhere. A pseudo-label (an amplified volume) is drawn ``amplified_weight`` times as often as a real
annotation. An organ that a case did not draw is never a foreground choice and its voxels are
never made background: the ``known`` mask travels with every patch to the partial-label loss.
Volumes smaller than the patch are padded once, with confidence 0 (no loss on padding).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import (Compose, MapTransform, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                              RandGaussianSmoothd, RandScaleIntensityd, Randomizable)

from monai.utils import convert_to_tensor

from fadal.config import AugmentConfig
from fadal.data.io import make_private, private_dir, read_record
from fadal.data.preprocess import training_item, training_transforms
from fadal.data.site import Site
from fadal.errors import FadalInputError
from fadal.records import AmplificationReport, AnyProvenance, FusionProvenance, Plan, PreprocessConfig, Provenance, SelfTrainProvenance

#: Voxel positions kept per organ and volume for foreground sampling (bounded memory).
MAX_INDICES_PER_ORGAN = 20_000


def site_training_items(site: Site, amplified: Path | None = None, use_amplified: bool = False) -> list[dict]:
    """Real labels always; amplified pseudo-labels (with their confidence maps) when asked for: a scan's
    pseudo-label counts when its label file and provenance exist and QC accepted it, with only the
    organs its provenance says were fused (the others stay unknown)."""
    items = [training_item(c.image, c.label, site.annotated_ids(c)) for c in site.labeled]
    if use_amplified and amplified is not None:
        amplified = training_label_dir(amplified)
        for case in site.unlabeled:
            label = amplified / "labels" / f"{case.case_id}.nii.gz"
            conf = amplified / "confidence" / f"{case.case_id}.nii.gz"
            prov_path = amplified / "provenance" / f"{case.case_id}.json"
            if not (label.exists() and prov_path.exists()):
                continue
            prov = read_provenance(prov_path)
            if provenance_qc_accepted(prov):
                items.append(training_item(case.image, label, amplified_known(prov, site), conf if conf.exists() else None,
                                           amplified=True))
    return items


def training_label_dir(amplified: Path) -> Path:
    """The folder whose labels/, confidence/ and provenance/ training reads: the chain's
    ``training_labels`` when ``amplification.json`` exists, else ``amplified`` itself (fusion only)."""
    amplified = Path(amplified)
    report = amplified / "amplification.json"
    if not report.exists():
        return amplified
    return amplified / read_record(AmplificationReport, report, "amplification report").training_labels


def read_provenance(path: Path) -> FusionProvenance | SelfTrainProvenance:
    """A pseudo-label sidecar of either stage (amplification or self-training); a malformed one is an
    error naming the file."""
    return read_record(AnyProvenance, path, "provenance")


def provenance_qc_accepted(provenance: Provenance) -> bool:
    """The QC decision of a provenance sidecar (both stages write ``status`` from their QC verdict)."""
    return provenance.accepted


def amplified_known(provenance: Provenance, site: Site) -> list[int]:
    """Organs the fusion actually produced and QC kept (an organ no atlas drew stays unknown)."""
    unknown = [o for o in provenance.organs_fused if o not in site.labels]
    if unknown:
        raise FadalInputError(f"provenance of {provenance.case}: organs {unknown} are not in {site.root}/dataset.json")
    return [site.labels[o] for o in provenance.organs_fused]


def with_version(item: dict, pre: PreprocessConfig) -> dict:
    """Add the preprocessing settings and file size/mtime so an on-disk preprocessing cache notices a
    changed preprocessing and changed inputs."""
    stamp = [pre.model_dump_json()]
    for key in ("image", "label", "confidence"):
        if item.get(key):
            st = Path(item[key]).stat()
            stamp.append(f"{st.st_size}-{st.st_mtime_ns}")
    return {**item, "version": "|".join(stamp)}


def known_mask(known: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    if isinstance(known, torch.Tensor) and known.dtype == torch.bool:
        return known.clone()
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[0] = True
    mask[list(known)] = True
    return mask


@dataclass
class Volume:
    """One preprocessed training volume, padded to at least the patch size."""

    image: torch.Tensor  # (1, X, Y, Z) float32 in [0, 1]
    label: torch.Tensor  # (1, X, Y, Z) uint8
    confidence: torch.Tensor | None  # (1, X, Y, Z) float32; None = 1 everywhere (a real annotation)
    known: torch.Tensor  # (C,) bool
    organ_voxels: dict[int, np.ndarray]  # organ -> flat indices of (some of) its voxels
    amplified: bool = False  # a pseudo-label, not a real annotation


def plain(x) -> torch.Tensor:
    """A plain tensor (MONAI's MetaTensor would route every operation of training through its metadata
    bookkeeping: measured 3x slower steps)."""
    return convert_to_tensor(x, track_meta=False)


def _pad_to(t: torch.Tensor, patch: Sequence[int], value: float) -> torch.Tensor:
    pads = []
    for size, p in zip(reversed(t.shape[1:]), reversed(tuple(patch))):
        extra = max(int(p) - int(size), 0)
        pads += [extra // 2, extra - extra // 2]
    return torch.nn.functional.pad(t, pads, value=value) if any(pads) else t


def make_volume(item: dict, patch: Sequence[int], num_classes: int, rng: np.random.Generator) -> Volume:
    """A preprocessed item (tensors) -> :class:`Volume`, with the voxel lists of its drawn organs."""
    image = plain(item["image"]).float()
    label = plain(item["label"]).round().to(torch.uint8)
    conf = item.get("confidence")
    conf = None if conf is None else plain(conf).float()
    if conf is not None and bool((conf >= 1.0).all()):
        conf = None
    needs_pad = any(s < p for s, p in zip(image.shape[1:], patch))
    if needs_pad:  # padding carries no loss: confidence 0 there
        conf = torch.ones_like(image) if conf is None else conf
        image, label, conf = _pad_to(image, patch, 0.0), _pad_to(label, patch, 0), _pad_to(conf, patch, 0.0)
    known = known_mask(item["known"], num_classes)
    flat = label.view(-1).numpy()
    organ_voxels = {}
    for organ in (int(c) for c in torch.nonzero(known).flatten() if int(c) != 0):
        where = np.flatnonzero(flat == organ)
        if where.size > MAX_INDICES_PER_ORGAN:
            where = rng.choice(where, MAX_INDICES_PER_ORGAN, replace=False)
        if where.size:
            organ_voxels[organ] = where
    return Volume(image.contiguous(), label.contiguous(), conf, known, organ_voxels, bool(item.get("amplified", False)))


def load_volumes(items: Sequence[dict], plan: Plan, num_classes: int, cache_dir: Path | None = None,
                 seed: int = 0) -> list[Volume]:
    """Read and preprocess every item once (on disk too when ``cache_dir`` is given, so fresh ClientApp
    processes in a deployment do not resample every round)."""
    fixed = training_transforms(plan.preprocess)
    versioned = [with_version(i, plan.preprocess) for i in items]
    if cache_dir is not None:
        ds = PersistentDataset(versioned, transform=fixed, cache_dir=private_dir(cache_dir))
    else:
        ds = CacheDataset(versioned, transform=fixed, progress=False, num_workers=0, copy_cache=False)
    rng = np.random.default_rng(seed)
    volumes = [make_volume(ds[i], plan.patch_size, num_classes, rng) for i in range(len(ds))]
    if cache_dir is not None:
        make_private(cache_dir)  # MONAI writes its cache files with the umask's mode
    return volumes


class MirrorLeftRightd(Randomizable, MapTransform):
    """Flip a patch along the left-right axis and swap the paired left/right labels (and their ``known``)."""

    def __init__(self, pairs: Sequence[tuple[int, int]], prob: float) -> None:
        MapTransform.__init__(self, ("image", "label", "confidence"))
        self.pairs = list(pairs)
        self.prob = prob
        self._do = False

    def randomize(self, data=None) -> None:
        self._do = self.R.random_sample() < self.prob

    def __call__(self, data: dict) -> dict:
        self.randomize()
        if not self._do or not self.pairs:
            return data
        d = dict(data)
        for key in ("image", "label", "confidence"):
            d[key] = torch.flip(plain(d[key]), dims=(1,))  # (C, X, Y, Z): X runs left-right (RAS)
        label = d["label"].clone()
        known = d["known"].clone()
        for a, b in self.pairs:
            label[d["label"] == a] = b
            label[d["label"] == b] = a
            known[a], known[b] = d["known"][b], d["known"][a]
        d["label"], d["known"] = label, known
        return d


def augmentation(cfg: AugmentConfig, mirror_pairs: Sequence[tuple[int, int]], seed: int) -> Compose | None:
    """nnU-Net's augmentation families, from MONAI, on (image, label, confidence) patches."""
    if not cfg.enabled:
        return None
    keys = ["image", "label", "confidence"]
    rot = math.radians(cfg.rotate_deg)
    steps = [
        RandAffined(keys=keys, prob=cfg.spatial_prob, rotate_range=(rot, rot, rot),
                    scale_range=(cfg.scale_range,) * 3, mode=("bilinear", "nearest", "bilinear"),
                    padding_mode="zeros"),  # confidence 0 outside the patch: no loss there
        RandGaussianNoised(keys="image", prob=cfg.noise_prob, std=0.03),
        RandGaussianSmoothd(keys="image", prob=cfg.blur_prob, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                            sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(keys="image", prob=cfg.brightness_prob, factors=0.25),
        RandAdjustContrastd(keys="image", prob=cfg.gamma_prob, gamma=(0.7, 1.5)),
    ]
    if mirror_pairs and cfg.mirror_prob > 0:
        steps.append(MirrorLeftRightd(mirror_pairs, cfg.mirror_prob))
    chain = Compose(steps)
    chain.set_random_state(seed=seed)
    return chain


class PatchSampler:
    """Draws training patches from cached volumes and from ``extra`` datasets (e.g. synthetic pairs, which
    make a new whole volume on every access), in proportion to their lengths."""

    def __init__(self, volumes: Sequence[Volume], plan: Plan, foreground_fraction: float,
                 augment: AugmentConfig, num_classes: int, extra: Sequence[torch.utils.data.Dataset] = (),
                 seed: int = 0, balance: str = "dataset", amplified_weight: float = 1.0) -> None:
        if not volumes and not extra:
            raise ValueError("nothing to train on: no volumes and no extra datasets")
        if balance not in ("case", "dataset"):
            raise ValueError(f"balance must be 'case' or 'dataset', not {balance!r}")
        self.volumes = list(volumes)
        self.extra = list(extra)
        self.patch = tuple(plan.patch_size)
        self.num_classes = num_classes
        self.foreground_fraction = foreground_fraction
        self.balance = balance
        self.rng = np.random.default_rng(seed)
        self.augment = augmentation(augment, plan.mirror_pairs, seed)
        self.sizes = [len(self.volumes)] + [len(e) for e in self.extra]
        if amplified_weight <= 0:
            raise ValueError(f"amplified_weight must be > 0, not {amplified_weight}")
        #: how often each cached volume is drawn, relative to the others (a pseudo-label: amplified_weight)
        self.weights = np.array([amplified_weight if v.amplified else 1.0 for v in self.volumes])
        self.uniform = bool(np.all(self.weights == 1.0))
        #: organ -> the cached volumes that drew it ('dataset' balance)
        self.drawn_in: dict[int, list[int]] = {}
        for i, vol in enumerate(self.volumes):
            for organ in vol.organ_voxels:
                self.drawn_in.setdefault(organ, []).append(i)

    def __len__(self) -> int:
        return sum(self.sizes)

    def _pick(self) -> tuple[Volume, int | None, bool]:
        """A volume, the organ to centre on (None: not chosen yet) and whether the foreground choice was made."""
        i = int(self.rng.integers(len(self)))
        if i < len(self.volumes):
            if self.balance == "dataset" and self.drawn_in and self.rng.random() < self.foreground_fraction:
                organs = sorted(self.drawn_in)
                organ = organs[int(self.rng.integers(len(organs)))]
                return self.volumes[self._weighted(self.drawn_in[organ])], organ, True
            if not self.uniform:
                i = self._weighted(range(len(self.volumes)))
            return self.volumes[i], None, self.balance == "dataset"
        i -= len(self.volumes)
        for ds in self.extra:
            if i < len(ds):
                return make_volume(ds[i], self.patch, self.num_classes, self.rng), None, False
            i -= len(ds)
        raise IndexError(i)

    def _weighted(self, indices: Sequence[int]) -> int:
        """One of ``indices`` (cached volumes), drawn in proportion to the volumes' weights."""
        indices = list(indices)
        if self.uniform:
            return indices[int(self.rng.integers(len(indices)))]
        w = self.weights[indices]
        return indices[int(self.rng.choice(len(indices), p=w / w.sum()))]

    def _centred_on(self, organ: int, shape: Sequence[int], vol: Volume) -> list[int]:
        voxels = vol.organ_voxels[organ]
        centre = np.unravel_index(int(voxels[int(self.rng.integers(voxels.size))]), shape)
        return [int(self.rng.integers(max(0, c - p + 1), min(c, s - p) + 1)) for c, p, s in zip(centre, self.patch, shape)]

    def _start(self, shape: Sequence[int], vol: Volume, decided: bool) -> list[int]:
        organs = list(vol.organ_voxels)
        if organs and not decided and self.rng.random() < self.foreground_fraction:
            return self._centred_on(organs[int(self.rng.integers(len(organs)))], shape, vol)
        return [int(self.rng.integers(0, s - p + 1)) for p, s in zip(self.patch, shape)]

    def draw(self) -> dict:
        vol, organ, decided = self._pick()
        shape = vol.image.shape[1:]
        start = self._centred_on(organ, shape, vol) if organ is not None else self._start(shape, vol, decided)
        window = (slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, self.patch))
        conf = vol.confidence[window] if vol.confidence is not None else torch.ones((1, *self.patch))
        patch = {"image": vol.image[window].clone(), "label": vol.label[window].float(), "confidence": conf.clone(),
                 "known": vol.known.clone()}
        if self.augment is not None:
            patch = self.augment(patch)
        return {"image": plain(patch["image"]).float(), "label": plain(patch["label"]).round().long(),
                "confidence": plain(patch["confidence"]).float(), "known": patch["known"]}

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        draws = [self.draw() for _ in range(size)]
        return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
