"""Amplification of one site: pseudo-label every unlabeled scan by multi-atlas registration and fusion.

Outputs (``out_dir``)::

    labels/<case>.nii.gz        fused label map (uint8, the scan's own grid); accepted scans only
    confidence/<case>.nii.gz    per-voxel fusion confidence (float32, [0, 1]); accepted scans only
    provenance/<case>.json      written last, for every scan: "status" (accepted / rejected) and
                                "reasons"; per atlas its status (used / failed / not_selected), reason,
                                similarity before / after initialisation / after registration, body
                                Dice; "qc" (per-organ measures and flags); "organs_fused" = the organs
                                training may trust (fused and accepted by QC), "organs_demoted"
    registrations/              cache of warped atlas labels and scans, keyed by content (see register.py)
    registration_model/         registration.method "learned": the site's network, keyed by its scans (learned.py)
    amplification.json          summary of the site (accepted / rejected with reasons, confidence, time)

Training (``fadal.model.patches.site_training_items``) uses a scan only when its label file and
provenance exist, and only the organs in ``organs_fused``: a rejected scan has no label file.

A case is done once its provenance file exists, so an interrupted run resumes where it stopped, and
registrations finished before the interruption come from the cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fadal.amplify.fuse import fuse_files, fused_classes
from fadal.amplify.qc import OrganReference, atlas_reference, check_pseudo_label, demote
from fadal.amplify.register import register_many
from fadal.amplify.result import RegistrationResult, registration_failure
from fadal.config import AmplifyConfig
from fadal.data.io import read_image, write_image, write_json
from fadal.errors import FadalInputError

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


def _organ_stats(label: np.ndarray, confidence: np.ndarray, names: dict[int, str], organs: list[int]) -> dict:
    stats = {}
    for c in organs:
        m = label == c
        n = int(m.sum())
        stats[names.get(c, str(c))] = {
            "voxels": n,
            "mean_confidence": round(float(confidence[m].mean()), 4) if n else None,
        }
    return stats


def _select_atlases(results: list[RegistrationResult], cfg: AmplifyConfig) -> tuple[list[int], dict[int, str]]:
    """Indices of the atlases to fuse (best NCC first, at most ``top_k``) and the reasons the others are not."""
    why: dict[int, str] = {}
    ok = []
    for i, r in enumerate(results):
        reason = registration_failure(r, cfg.registration)
        if reason is None:
            ok.append(i)
        else:
            why[i] = f"registration failed: {reason}"
    ok.sort(key=lambda i: -results[i].metric_after)
    k = cfg.fusion.top_k or len(ok)
    for i in ok[k:]:
        why[i] = f"not selected: NCC {results[i].metric_after:.3f} outside the best top_k={k}"
    return ok[:k], why


def _amplify_case(case: str, img: Path, atlases: Labeled, results: list[RegistrationResult], out_dir: Path,
                  cfg: AmplifyConfig, num_classes: int, names: dict[int, str],
                  reference: dict[int, OrganReference]) -> dict:
    """Select atlases, fuse, check and write one scan's pseudo-label (none if rejected); return its provenance."""
    t0 = time.perf_counter()
    chosen, why = _select_atlases(results, cfg)
    provenance: dict = {
        "case": case,
        "image": str(img),
        "fusion_method": cfg.fusion.method,
        "atlases": [
            {
                "case": a_case, "image": str(a_img), "label": str(a_lab),
                "annotated": [names.get(c, str(c)) for c in ids],
                "status": "used" if i in chosen else "failed" if why[i].startswith("registration") else "not_selected",
                "reason": why.get(i),
                "warped_label": None if r.warped_label is None else str(r.warped_label),
                "metric": r.metric_name, "metric_before": _r(r.metric_before), "metric_init": _r(r.metric_init),
                "metric_after": _r(r.metric_after), "body_dice": _r(r.body_dice), "overlap": _r(r.overlap),
                "init_translation_mm": [round(v, 2) for v in r.init_translation_mm],
                "seconds": r.seconds, "cached": r.cached,
            }
            for i, ((a_case, a_img, a_lab, ids), r) in enumerate(zip(atlases, results))
        ],
        "registration_seconds": round(sum(r.seconds for r in results if not r.cached), 3),
        "config": cfg.model_dump(mode="json"),
    }
    label_path, conf_path = out_dir / "labels" / f"{case}.nii.gz", out_dir / "confidence" / f"{case}.nii.gz"
    for stale in (label_path, conf_path):  # a rejected re-run must not leave an old pseudo-label behind
        stale.unlink(missing_ok=True)

    if not chosen:
        provenance.update(status="rejected", reasons=[f"all {len(atlases)} atlas registrations failed"],
                          organs_fused=[], organs={}, fusion_seconds=0.0)
        return provenance

    annotated = [atlases[i][3] for i in chosen]
    fused = fused_classes(num_classes, annotated, len(chosen))
    reference_img = read_image(img)
    label_img, conf_img = fuse_files(
        [results[i].warped_label for i in chosen], reference_img, num_classes, annotated, method=cfg.fusion.method,
        image_paths=[results[i].warped_image for i in chosen] if cfg.fusion.method == "weighted" else None,
        sigma_hu=cfg.fusion.weight_sigma_hu, radius_mm=cfg.fusion.weight_radius_mm,
    )
    lab, conf = sitk.GetArrayFromImage(label_img), sitk.GetArrayFromImage(conf_img)
    voxel_ml = float(np.prod(reference_img.GetSpacing())) / 1000.0
    qc = check_pseudo_label(lab, conf, voxel_ml, fused, reference, names, cfg.qc)
    provenance["qc"] = qc.to_json(names)
    if not qc.accepted:
        provenance.update(status="rejected", reasons=qc.reasons, organs_fused=[],
                          organs_not_fused=[names.get(c, str(c)) for c in range(1, num_classes)],
                          organs=_organ_stats(lab, conf, names, fused),
                          fusion_seconds=round(time.perf_counter() - t0, 3))
        return provenance

    lab, conf = demote(lab, conf, qc.demoted)
    write_image(_like(lab, reference_img), label_path)
    write_image(_like(conf, reference_img), conf_path)
    fg = lab > 0
    provenance.update(
        status="accepted",
        reasons=qc.reasons,  # organs demoted to unknown, if any
        # What training may trust: organs fused and accepted by QC (the others are unknown here).
        organs_fused=[names.get(c, str(c)) for c in qc.kept],
        organs_not_fused=[names.get(c, str(c)) for c in range(1, num_classes) if c not in qc.kept],
        organs_demoted=[names.get(c, str(c)) for c in qc.demoted],
        organs=_organ_stats(lab, conf, names, qc.kept),
        mean_confidence=round(float(conf.mean()), 4),
        mean_confidence_foreground=round(float(conf[fg].mean()), 4) if fg.any() else None,
        fusion_seconds=round(time.perf_counter() - t0, 3),
    )
    return provenance


def _r(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


def amplify_site(site_dir: Path, out_dir: Path, cfg: AmplifyConfig,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Pseudo-label the unlabeled scans of ``site_dir`` into ``out_dir``; return the summary dict.

    The first ``cfg.max_atlases`` labeled cases (by case id) are the atlases. Every (scan, atlas)
    pair still to do is registered in one :func:`register_many` call, so all ``workers`` are busy.
    Per scan, atlases whose registration failed (:func:`register.registration_failure`) are
    excluded, the best ``cfg.fusion.top_k`` by NCC are fused with ``cfg.fusion.method`` (each atlas
    voting only on the organs it annotated), and the result goes through QC (:mod:`qc`). A scan
    whose atlases all failed, or that QC rejects, gets no label file and is listed under
    ``"rejected"`` with its reasons. ``progress(stage, done, total)`` is called with stage
    ``"register"`` after each registration and ``"fuse"`` after each scan.

    Summary keys: ``n_scans``, ``n_accepted``, ``n_rejected``, ``rejected`` (``[{"case",
    "reasons"}]``), ``mean_confidence`` (per organ, over accepted scans), timings, ``per_case``.
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
    fused_all = fused_classes(num_classes, annotated, len(atlases))

    prov_dir = out_dir / "provenance"
    todo = [(case, img) for case, img in unlabeled if not (prov_dir / f"{case}.json").exists()]
    pairs = [(img, a_img, a_lab) for _, img in todo for _, a_img, a_lab, _ in atlases]
    done = [0]

    def _on_result(_: RegistrationResult) -> None:
        done[0] += 1
        if progress is not None:
            progress("register", done[0], len(pairs))

    if not pairs:
        results = []
    elif cfg.registration.method == "learned":
        # Trained once on all the site's scans (labels unused), cached by their content; see learned.py.
        from fadal.amplify import learned

        model = learned.site_model([i for _, i, *_ in labeled] + [i for _, i in unlabeled],
                                   out_dir / "registration_model", cfg.registration)
        results = learned.register_many(model, pairs, out_dir / "registrations", cfg.registration, _on_result)
    else:
        results = register_many(pairs, out_dir / "registrations", cfg.registration, _on_result, errors="record")
    reference = atlas_reference([a_lab for _, _, a_lab, _ in atlases], annotated, fused_all) if todo else {}

    for k, (case, img) in enumerate(todo):
        res = results[k * len(atlases): (k + 1) * len(atlases)]
        provenance = _amplify_case(case, img, atlases, res, out_dir, cfg, num_classes, names, reference)
        write_json(provenance, prov_dir / f"{case}.json")  # last: marks the case done
        if progress is not None:
            progress("fuse", k + 1, len(todo))

    per_case, rejected, organ_conf = {}, [], {}
    for case, _ in unlabeled:
        p = json.loads((prov_dir / f"{case}.json").read_text())
        status = p.get("status", "accepted")
        per_case[case] = {
            "status": status,
            "reasons": p.get("reasons", []),
            "mean_confidence": p.get("mean_confidence"),
            "mean_confidence_foreground": p.get("mean_confidence_foreground"),
            "organs": p.get("organs", {}) if status == "accepted" else {},
            "organs_demoted": p.get("organs_demoted", []),
            "seconds": round(p.get("registration_seconds", 0.0) + p.get("fusion_seconds", 0.0), 3),
        }
        if status == "rejected":
            rejected.append({"case": case, "reasons": p.get("reasons", [])})
        else:
            for organ, stats in (p.get("organs") or {}).items():
                if stats.get("mean_confidence") is not None:
                    organ_conf.setdefault(organ, []).append(stats["mean_confidence"])
    summary = {
        "site": str(site_dir),
        "n_scans": len(unlabeled),
        "n_accepted": len(unlabeled) - len(rejected),
        "n_rejected": len(rejected),
        "rejected": rejected,
        "mean_confidence": {o: round(float(np.mean(v)), 4) for o, v in organ_conf.items()},
        "n_amplified_this_run": len(todo),
        "n_atlases": len(atlases),
        "atlases": [case for case, *_ in atlases],
        "n_registrations_this_run": sum(1 for r in results if not r.cached and r.error is None),
        "n_failed_registrations_this_run": sum(1 for r in results if registration_failure(r, cfg.registration)),
        "registration_seconds_this_run": round(sum(r.seconds for r in results if not r.cached), 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "fusion_method": cfg.fusion.method,
        "organs_fused": [names.get(c, str(c)) for c in fused_all],
        "organs_not_fused": [names.get(c, str(c)) for c in range(1, num_classes) if c not in fused_all],
        "per_case": per_case,
    }
    write_json(summary, out_dir / "amplification.json")
    return summary
