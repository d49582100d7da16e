"""Amplification of one site: pseudo-label every unlabeled scan by multi-atlas registration and fusion.

Outputs (``out_dir``)::

    labels/<case>.nii.gz        fused label map (uint8, the scan's own grid)
    confidence/<case>.nii.gz    per-voxel fusion confidence (float32, [0, 1])
    provenance/<case>.json      atlases, their similarity before/after, timings, organs fused (written last)
    registrations/              cache of warped atlas labels, keyed by content (see register.py)
    amplification.json          summary of the site

A case is done once its provenance file exists, so an interrupted run resumes where it stopped, and
registrations finished before the interruption come from the cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from fadal.config import AmplifyConfig
from fadal.data.io import FadalInputError, read_image, write_image, write_json
from fadal.amplify.fuse import fuse_files, fused_classes
from fadal.amplify.register import RegistrationResult, register_many

Labeled = list[tuple[str, Path, Path, list[int]]]
Unlabeled = list[tuple[str, Path]]


def _list_cases(site_dir: Path) -> tuple[Labeled, Unlabeled, dict[str, int]]:
    """Minimal reader of an nnU-Net v2 raw site folder (to be replaced by ``fadal.data.site.load_site``).

    Returns ``(labeled, unlabeled, labels)``: labeled = ``[(case_id, image, label, annotated ids)]``,
    unlabeled = ``[(case_id, image)]``, labels = ``dataset.json``'s ``{name: id}``. A case is labeled
    when ``labelsTr/<case>`` exists, unless ``cases.json`` says otherwise: split ``"unlabeled"``
    makes it a target (its label file is not used), split ``"test"`` leaves it out altogether (no
    test label may leak into training data through an atlas).
    """
    site_dir = Path(site_dir)
    ds_path = site_dir / "dataset.json"
    try:
        dataset = json.loads(ds_path.read_text())
    except FileNotFoundError as err:
        raise FadalInputError(f"{ds_path}: not found; is {site_dir} an nnU-Net v2 raw dataset folder?") from err
    except json.JSONDecodeError as err:
        raise FadalInputError(f"{ds_path}: not valid JSON ({err})") from err
    raw_labels = dataset.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise FadalInputError(f"{ds_path}: needs a 'labels' object like {{\"background\": 0, \"liver\": 1}}")
    labels: dict[str, int] = {}
    for name, value in raw_labels.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
            raise FadalInputError(f"{ds_path}: label {name!r} must be an integer in 0..255, got {value!r}")
        labels[name] = value
    ending = dataset.get("file_ending", ".nii.gz")

    cases_meta: dict = {}
    cj = site_dir / "cases.json"
    if cj.exists():
        try:
            cases_meta = json.loads(cj.read_text())
        except json.JSONDecodeError as err:
            raise FadalInputError(f"{cj}: not valid JSON ({err})") from err
    organ_ids = {n: v for n, v in labels.items() if v != 0}

    images_dir, labels_dir = site_dir / "imagesTr", site_dir / "labelsTr"
    if not images_dir.is_dir():
        raise FadalInputError(f"{images_dir}: folder not found")
    suffix = "_0000" + ending
    labeled: Labeled = []
    unlabeled: Unlabeled = []
    for image in sorted(images_dir.glob("*" + suffix)):
        case = image.name[: -len(suffix)]
        meta = cases_meta.get(case, {})
        split = meta.get("split")
        label = labels_dir / (case + ending)
        if split == "test":
            continue
        if split == "unlabeled" or (split is None and not label.exists()):
            unlabeled.append((case, image))
            continue
        if not label.exists():
            raise FadalInputError(f"{cj}: case {case!r} is marked {split!r} but {label} does not exist")
        names = meta.get("annotated")
        if names is None:
            ids = sorted(organ_ids.values())
        else:
            unknown = [n for n in names if n not in organ_ids]
            if unknown:
                raise FadalInputError(f"{cj}: case {case!r} annotates unknown organs {unknown}; "
                                      f"dataset.json declares {sorted(organ_ids)}")
            ids = sorted({organ_ids[n] for n in names})
        labeled.append((case, image, label, ids))
    return labeled, unlabeled, labels


def _organ_stats(label: np.ndarray, confidence: np.ndarray, names: dict[int, str], fused: list[int]) -> dict:
    stats = {}
    for c in fused:
        m = label == c
        n = int(m.sum())
        stats[names.get(c, str(c))] = {
            "voxels": n,
            "mean_confidence": round(float(confidence[m].mean()), 4) if n else None,
        }
    return stats


def amplify_site(site_dir: Path, out_dir: Path, cfg: AmplifyConfig,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Pseudo-label the unlabeled scans of ``site_dir`` into ``out_dir``; return the summary dict.

    The first ``cfg.max_atlases`` labeled cases (by case id) are the atlases. Every (scan, atlas)
    pair still to do is registered in one :func:`register_many` call, so all ``workers`` are busy;
    then each scan's warped atlas labels are fused (:func:`fuse.majority_vote`, each atlas voting only
    on the organs it annotated). ``progress(stage, done, total)`` is called with stage
    ``"register"`` after each registration and ``"fuse"`` after each scan.
    """
    t_start = time.perf_counter()
    site_dir, out_dir = Path(site_dir), Path(out_dir)
    labeled, unlabeled, labels = _list_cases(site_dir)
    if not labeled:
        raise FadalInputError(f"{site_dir}: no labeled case to use as an atlas (labelsTr is empty)")
    num_classes = max(labels.values()) + 1
    names = {v: n for n, v in labels.items()}
    atlases = labeled[: cfg.max_atlases]
    annotated = [ids for _, _, _, ids in atlases]
    fused = fused_classes(num_classes, annotated, len(atlases))
    not_fused = [names.get(c, str(c)) for c in range(1, num_classes) if c not in fused]

    prov_dir = out_dir / "provenance"
    todo = [(case, img) for case, img in unlabeled if not (prov_dir / f"{case}.json").exists()]
    pairs = [(img, a_img, a_lab) for _, img in todo for _, a_img, a_lab, _ in atlases]
    done = [0]

    def _on_result(_: RegistrationResult) -> None:
        done[0] += 1
        if progress is not None:
            progress("register", done[0], len(pairs))

    results = register_many(pairs, out_dir / "registrations", cfg.registration, _on_result) if pairs else []

    for k, (case, img) in enumerate(todo):
        res = results[k * len(atlases): (k + 1) * len(atlases)]
        reference = read_image(img)
        label_img, conf_img = fuse_files([r.warped_label for r in res], reference, num_classes, annotated,
                                         method=cfg.fusion.method)
        write_image(label_img, out_dir / "labels" / f"{case}.nii.gz")
        write_image(conf_img, out_dir / "confidence" / f"{case}.nii.gz")
        lab = sitk.GetArrayViewFromImage(label_img)
        conf = sitk.GetArrayViewFromImage(conf_img)
        fg = lab > 0
        provenance = {
            "case": case,
            "image": str(img),
            "fusion_method": cfg.fusion.method,
            "atlases": [
                {
                    "case": a_case, "image": str(a_img), "label": str(a_lab),
                    "annotated": [names.get(c, str(c)) for c in ids],
                    "warped_label": str(r.warped_label), "metric": r.metric_name,
                    "metric_before": round(r.metric_before, 4), "metric_after": round(r.metric_after, 4),
                    "seconds": r.seconds, "cached": r.cached,
                }
                for (a_case, a_img, a_lab, ids), r in zip(atlases, res)
            ],
            "registration_seconds": round(sum(r.seconds for r in res if not r.cached), 3),
            "organs_fused": [names.get(c, str(c)) for c in fused],
            "organs_not_fused": not_fused,
            "organs": _organ_stats(lab, conf, names, fused),
            "mean_confidence": round(float(conf.mean()), 4),
            "mean_confidence_foreground": round(float(conf[fg].mean()), 4) if fg.any() else None,
            "config": cfg.model_dump(mode="json"),
        }
        write_json(provenance, prov_dir / f"{case}.json")  # last: marks the case done
        if progress is not None:
            progress("fuse", k + 1, len(todo))

    per_case = {}
    for case, _ in unlabeled:
        p = json.loads((prov_dir / f"{case}.json").read_text())
        per_case[case] = {
            "mean_confidence": p["mean_confidence"],
            "mean_confidence_foreground": p["mean_confidence_foreground"],
            "organs": p["organs"],
        }
    summary = {
        "site": str(site_dir),
        "n_scans": len(unlabeled),
        "n_amplified_this_run": len(todo),
        "n_atlases": len(atlases),
        "atlases": [case for case, *_ in atlases],
        "n_registrations_this_run": sum(1 for r in results if not r.cached),
        "registration_seconds_this_run": round(sum(r.seconds for r in results if not r.cached), 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "fusion_method": cfg.fusion.method,
        "organs_fused": [names.get(c, str(c)) for c in fused],
        "organs_not_fused": not_fused,
        "per_case": per_case,
    }
    write_json(summary, out_dir / "amplification.json")
    return summary
