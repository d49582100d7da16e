"""OpenKBP helpers shared by the benchmarks: case lists per site and split, per-site nnU-Net views, and
command-line overrides of a benchmark's settings.

A view is a site folder made of symlinks into the one OpenKBP folder (nothing is copied):
``imagesTr`` holds the training scans, ``labelsTr`` only the labels a site is allowed to use (a scan
without one is unlabeled), ``imagesTs``/``labelsTs`` the evaluation cases. ``cases.json`` keeps each
case's ``annotated`` organs (OpenKBP annotations are partial).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path


def spread(items: list[str], n: int) -> list[str]:
    """n items evenly spread over a sorted list (deterministic; not just the first n)."""
    if n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def site_case_ids(meta: dict, site: str, split: str) -> list[str]:
    """Sorted case ids of one OpenKBP site in one official split ('train' / 'validation')."""
    return sorted(c for c, m in meta.items() if m.get("site") == site and m.get("official_split") == split)


def write_view(root: Path, train_data: Path, eval_data: Path, labeled: Sequence[str], evaluation: Sequence[str],
               unlabeled: Sequence[str] = ()) -> Path:
    """(Re)create the site folder ``root``: ``labeled`` + ``unlabeled`` training scans from ``train_data``,
    labels for ``labeled`` only, ``evaluation`` cases (with labels) from ``eval_data``."""
    train_meta = json.loads((train_data / "cases.json").read_text())
    eval_meta = json.loads((eval_data / "cases.json").read_text())
    if root.exists():
        shutil.rmtree(root)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
    cases: dict[str, dict] = {}

    def link(src: Path, case: str, tr: str, with_label: bool) -> None:
        (root / f"images{tr}" / f"{case}_0000.nii.gz").symlink_to((src / "imagesTr" / f"{case}_0000.nii.gz").resolve())
        if with_label:
            (root / f"labels{tr}" / f"{case}.nii.gz").symlink_to((src / "labelsTr" / f"{case}.nii.gz").resolve())

    for c in labeled:
        link(train_data, c, "Tr", True)
        cases[c] = {"annotated": train_meta[c]["annotated"], "split": "train"}
    for c in unlabeled:
        link(train_data, c, "Tr", False)
        cases[c] = {"split": "unlabeled"}
    for c in evaluation:
        link(eval_data, c, "Ts", True)
        cases[c] = {"annotated": eval_meta[c]["annotated"], "split": "validation"}
    (root / "dataset.json").symlink_to((train_data / "dataset.json").resolve())
    (root / "cases.json").write_text(json.dumps(cases, indent=1))
    return root


def with_overrides(settings, args, scalars: Sequence[str] = (), lists: dict[str, type] | None = None):
    """``settings`` (a dataclass) with the options the user gave: ``scalars`` as they are, ``lists``
    from comma-separated text, each item converted with its type (e.g. ``{"ks": int}``)."""
    for key in scalars:
        if getattr(args, key) is not None:
            settings = replace(settings, **{key: getattr(args, key)})
    for key, conv in (lists or {}).items():
        if getattr(args, key):
            settings = replace(settings, **{key: tuple(conv(v.strip()) for v in getattr(args, key).split(",") if v.strip())})
    return settings
