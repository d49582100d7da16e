"""A hospital's data folder: which scans are labeled, unlabeled or held out, and which organs were drawn.

Accepted layouts:

* nnU-Net v2 raw: ``dataset.json`` (``labels``: name -> value), ``imagesTr/<case>_0000.nii.gz``,
  ``labelsTr/<case>.nii.gz``; images without a label file are the site's unlabeled scans. Held-out
  test scans live in ``imagesTs/`` with references in ``labelsTs/``.
* MSD: ``dataset.json`` with ``labels`` as value -> name and ``training: [{image, label}]``.

An optional ``cases.json`` maps case id -> ``{"annotated": [organ, ...], "split": ...}``. An organ
missing from ``annotated`` was never drawn in that case: its voxels are *unknown*, not background,
and the loss must not teach the network that they are background.
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


def load_site(root: str | Path, name: str | None = None, cases_json: str | Path | None = None,
              validate: bool = True) -> Site:
    """Index a site folder; with ``validate`` every image/label pair is opened and checked."""
    root = Path(root)
    if not root.is_dir():
        raise FadalInputError(f"{root}: site folder not found")
    meta = read_dataset_json(root)
    labels = parse_labels(meta, root / "dataset.json")
    organs = [n for n, v in labels.items() if v != 0]
    cj = Path(cases_json) if cases_json else root / "cases.json"
    case_meta: dict = json.loads(cj.read_text()) if cj.exists() else {}

    def make_case(cid: str, image: Path, label: Path | None, default_split: str) -> Case:
        info = case_meta.get(cid, {})
        annotated = list(info.get("annotated", organs if label is not None else []))
        bad = [o for o in annotated if o not in labels]
        if bad:
            raise FadalInputError(f"{cj}: case {cid} lists unknown organs {bad}; dataset.json has {organs}")
        split = info.get("split", default_split)
        return Case(cid, image, label, annotated if label is not None else [], split)

    labeled: list[Case] = []
    unlabeled: list[Case] = []
    test: list[Case] = []
    if "training" in meta and isinstance(meta["training"], list) and meta["training"] and isinstance(meta["training"][0], dict):
        for entry in meta["training"]:  # MSD layout
            image = (root / entry["image"]).resolve()
            label = (root / entry["label"]).resolve() if entry.get("label") else None
            cid = strip_suffix(image.name)
            (labeled if label else unlabeled).append(make_case(cid, image, label, "labeled" if label else "unlabeled"))
        for entry in meta.get("test", []):
            img = root / (entry["image"] if isinstance(entry, dict) else entry)
            lab = root / entry["label"] if isinstance(entry, dict) and entry.get("label") else None
            if lab is not None:
                test.append(make_case(strip_suffix(img.name), img, lab, "test"))
    else:
        for split_dir, label_dir, bucket in (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test")):
            img_dir = root / split_dir
            if not img_dir.is_dir():
                if split_dir == "imagesTr":
                    raise FadalInputError(f"{root}: no imagesTr/ folder (nnU-Net v2 layout expected)")
                continue
            for image in sorted(img_dir.iterdir()):
                stem = strip_suffix(image.name)
                if stem == image.name or image.name.startswith("."):
                    continue
                if not stem.endswith("_0000"):
                    raise FadalInputError(f"{image}: nnU-Net images are named <case>_0000{IMAGE_SUFFIXES[0]}")
                cid = stem[: -len("_0000")]
                label = next((root / label_dir / f"{cid}{s}" for s in IMAGE_SUFFIXES
                              if (root / label_dir / f"{cid}{s}").exists()), None)
                if bucket == "test":
                    if label is not None:
                        test.append(make_case(cid, image, label, "test"))
                    continue
                case = make_case(cid, image, label, "labeled" if label else "unlabeled")
                if case.split == "test" and label is not None:
                    test.append(case)
                else:
                    (labeled if label is not None else unlabeled).append(case)
    if not labeled and not unlabeled:
        raise FadalInputError(f"{root}: no training images found")
    site = Site(root, name or root.name, labels, labeled, unlabeled, test)
    if validate:
        for case in site.labeled + site.test:
            load_pair(site, case)
        for case in site.unlabeled:
            check_image_values(read_image(case.image), case.image)
    return site


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
