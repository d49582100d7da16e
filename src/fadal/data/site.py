"""A hospital's data folder: which scans are labeled, unlabeled or held out, and which organs were drawn.

Accepted layouts:

* nnU-Net v2 raw: ``dataset.json`` (``labels``: name -> value), ``imagesTr/<case>_0000.nii.gz``,
  ``labelsTr/<case>.nii.gz``; images without a label file are the site's unlabeled scans. Held-out
  test scans live in ``imagesTs/`` with references in ``labelsTs/``.
* MSD: ``dataset.json`` with ``labels`` as value -> name and ``training: [{image, label}]``.

An optional ``cases.json`` maps case id -> ``{"annotated": [organ, ...], "split": ...}``. An organ
missing from ``annotated`` was never drawn in that case: its voxels are *unknown*, not background,
and the loss must not teach the network that they are background. ``split`` decides a training case's
role (:func:`training_role`): ``"unlabeled"`` makes a scan unlabeled even if a label file exists.

This module is the one reader of a site folder: amplification, training, planning and self-training
all take their cases from :func:`load_site`, so they never disagree on which scan is which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from fadal.data.io import check_image_values, check_label, read_image
from fadal.errors import FadalInputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class Case:
    case_id: str
    image: Path
    label: Path | None = None
    annotated: list[str] = field(default_factory=list)  # organ names drawn in `label`
    split: str = "train"  # "labeled" | "unlabeled" | "test" | "train" | "validation" ...


@dataclass
class Site:
    root: Path
    name: str
    labels: dict[str, int]  # includes "background": 0
    labeled: list[Case]
    unlabeled: list[Case]
    test: list[Case]

    @property
    def organs(self) -> list[str]:
        return [n for n, v in sorted(self.labels.items(), key=lambda kv: kv[1]) if v != 0]

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    def annotated_ids(self, case: Case) -> list[int]:
        return [self.labels[o] for o in case.annotated]


def strip_suffix(name: str) -> str:
    for suf in IMAGE_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.exists():
        raise FadalInputError(f"{path}: missing; a site folder needs a dataset.json with 'labels'")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FadalInputError(f"{path}: not valid JSON ({err})") from err
    if "labels" not in meta or not isinstance(meta["labels"], dict):
        raise FadalInputError(f"{path}: no 'labels' mapping (nnU-Net: name -> value; MSD: value -> name)")
    return meta


def parse_labels(meta: dict, path: Path) -> dict[str, int]:
    """nnU-Net v2 stores name -> value, MSD stores "value" -> name; return name -> value."""
    raw = meta["labels"]
    try:
        if all(str(k).lstrip("-").isdigit() for k in raw):  # MSD
            labels = {str(v): int(k) for k, v in raw.items()}
        else:
            labels = {str(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        raise FadalInputError(f"{path}: label values must be integers ({err})") from err
    if 0 not in labels.values():
        raise FadalInputError(f"{path}: labels must include background = 0")
    return labels


def read_cases_json(path: Path) -> dict[str, dict]:
    """``cases.json``: case id -> ``{"annotated": [...], "split": ...}`` (empty when the file is absent)."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FadalInputError(f"{path}: not valid JSON ({err})") from err
    bad = [k for k, v in meta.items() if not isinstance(v, dict)] if isinstance(meta, dict) else ["(top level)"]
    if bad:
        raise FadalInputError(f"{path}: each entry must be an object like {{\"annotated\": [...], \"split\": ...}}; "
                              f"not so for {bad[:3]}")
    return meta


def training_role(cid: str, label: Path | None, split: str | None, cases_json: Path) -> str:
    """Where a training-folder case goes: ``"labeled"``, ``"unlabeled"`` or ``"test"``. THE rule, for
    every reader of a site (amplification, training, planning, self-training):

    * no ``split`` in ``cases.json``: labeled when its label file exists, else unlabeled;
    * ``"unlabeled"``: unlabeled **even when a label file exists** (that file is never read: a site may
      keep reference labels of scans it treats as unannotated, e.g. to measure pseudo-labels);
    * ``"test"``: held out (never an atlas, never trained on); it needs its label file;
    * any other split (``"labeled"``, ``"train"``, ``"validation"``, ...): labeled; it needs its label file.

    A split that needs a label file without one is an error naming both, not a silent demotion.
    """
    if split is None:
        return "labeled" if label is not None else "unlabeled"
    if split == "unlabeled":
        return "unlabeled"
    if label is None:
        raise FadalInputError(f"{cases_json}: case {cid} is marked split {split!r} but has no label file; "
                              "add its label or mark it \"unlabeled\"")
    return "test" if split == "test" else "labeled"


def load_site(root: str | Path, name: str | None = None, cases_json: str | Path | None = None,
              validate: bool = True) -> Site:
    """Index a site folder; with ``validate`` every image/label pair is opened and checked (once, up
    front: a bad file is one :class:`FadalInputError` naming it before any work starts).

    Which case is labeled, unlabeled or held out: :func:`training_role`. Held-out scans in
    ``imagesTs/`` (MSD: ``test``) count only with a reference label."""
    root = Path(root)
    if not root.is_dir():
        raise FadalInputError(f"{root}: site folder not found")
    meta = read_dataset_json(root)
    labels = parse_labels(meta, root / "dataset.json")
    organs = [n for n, v in labels.items() if v != 0]
    cj = Path(cases_json) if cases_json else root / "cases.json"
    case_meta = read_cases_json(cj)
    buckets: dict[str, list[Case]] = {"labeled": [], "unlabeled": [], "test": []}

    def add(cid: str, image: Path, label: Path | None, role: str | None = None) -> None:
        info = case_meta.get(cid, {})
        role = role or training_role(cid, label, info.get("split"), cj)
        if role == "unlabeled":
            label = None
        annotated = list(info.get("annotated", organs)) if label is not None else []
        bad = [o for o in annotated if o not in labels]
        if bad:
            raise FadalInputError(f"{cj}: case {cid} lists unknown organs {bad}; dataset.json has {organs}")
        buckets[role].append(Case(cid, image, label, annotated, info.get("split", role)))

    training = meta.get("training")
    if isinstance(training, list) and training and isinstance(training[0], dict):
        for entry in training:  # MSD layout
            image = (root / entry["image"]).resolve()
            add(strip_suffix(image.name), image, (root / entry["label"]).resolve() if entry.get("label") else None)
        for entry in meta.get("test", []):
            img = root / (entry["image"] if isinstance(entry, dict) else entry)
            if isinstance(entry, dict) and entry.get("label"):
                add(strip_suffix(img.name), img, root / entry["label"], "test")
    else:
        for image, label in _nnunet_cases(root, "imagesTr", "labelsTr", required=True):
            add(_case_id(image), image, label)
        for image, label in _nnunet_cases(root, "imagesTs", "labelsTs", required=False):
            if label is not None:
                add(_case_id(image), image, label, "test")
    if not buckets["labeled"] and not buckets["unlabeled"]:
        raise FadalInputError(f"{root}: no training images found")
    site = Site(root, name or root.name, labels, buckets["labeled"], buckets["unlabeled"], buckets["test"])
    if validate:
        for case in site.labeled + site.test:
            load_pair(site, case)
        for case in site.unlabeled:
            check_image_values(read_image(case.image), case.image)
    return site


def _nnunet_cases(root: Path, images: str, labels: str, required: bool) -> list[tuple[Path, Path | None]]:
    """``(image, label or None)`` for each ``<case>_0000`` image of an nnU-Net folder, by file name."""
    img_dir = root / images
    if not img_dir.is_dir():
        if required:
            raise FadalInputError(f"{root}: no {images}/ folder (nnU-Net v2 layout expected)")
        return []
    found = []
    for image in sorted(img_dir.iterdir()):
        stem = strip_suffix(image.name)
        if stem == image.name or image.name.startswith("."):
            continue
        if not stem.endswith("_0000"):
            raise FadalInputError(f"{image}: nnU-Net images are named <case>_0000{IMAGE_SUFFIXES[0]}")
        cid = stem[: -len("_0000")]
        found.append((image, next((root / labels / f"{cid}{s}" for s in IMAGE_SUFFIXES
                                   if (root / labels / f"{cid}{s}").exists()), None)))
    return found


def _case_id(image: Path) -> str:
    return strip_suffix(image.name)[: -len("_0000")]


def load_pair(site: Site, case: Case) -> tuple[sitk.Image, sitk.Image | None]:
    """Read a case's image (and label), with every check that names the file on failure."""
    image = read_image(case.image)
    check_image_values(image, case.image)
    if case.label is None:
        return image, None
    label = read_image(case.label)
    check_label(label, image, set(site.labels.values()), case.label, case.image)
    check_annotated(label, site.labels, case)
    return image, label


def check_annotated(label: sitk.Image, labels: dict[str, int], case: Case) -> None:
    """The organs a label map contains must be the organs its case says were drawn.

    A drawn organ with no voxels usually means a wrong label mapping; voxels of an organ not listed
    as drawn mean ``cases.json`` is stale. Either would teach the network something false."""
    import numpy as np

    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(label))} - {0}
    names = {v: k for k, v in labels.items()}
    drawn = {labels[o] for o in case.annotated}
    missing = sorted(names[v] for v in drawn - present)
    if missing:
        raise FadalInputError(
            f"{case.label}: organs {missing} are listed as annotated but have no voxels; "
            "remove them from this case's 'annotated' list in cases.json if they were not drawn"
        )
    extra = sorted(names[v] for v in present - drawn)
    if extra:
        raise FadalInputError(
            f"{case.label}: contains {extra} but cases.json lists only {sorted(case.annotated)} as annotated"
        )
