"""Amplification of one site: pseudo-label every unlabeled scan by multi-atlas registration and fusion.

Outputs (``out_dir``)::

    labels/<case>.nii.gz        fused label map (uint8, the scan's own grid); accepted scans only
    confidence/<case>.nii.gz    per-voxel fusion confidence (float32, [0, 1]); accepted scans only
    provenance/<case>.json      a :class:`fadal.records.FusionProvenance`, written last, for every scan:
                                status (accepted / rejected) and reasons; per atlas its status (used /
                                failed / not_selected), reason, similarity before / after initialisation /
                                after registration, body Dice; QC (per-organ measures and flags);
                                ``organs_fused`` = the organs training may trust (fused and accepted by QC)
    registrations/              cache of warped atlas labels and scans, keyed by content (see cache.py)
    fusion.json                 a :class:`fadal.records.AmplificationSummary` of the site's fusion
                                (amplify/chain.py adds synthesis and self-training: amplification.json)

The site is read by :func:`fadal.data.site.load_site`, the one site reader, with every image and label
checked before any registration starts: an unreadable, truncated or constant scan, or an atlas label
with a value ``dataset.json`` does not define, is an error naming the file, never a "failed registration".

Training (``fadal.model.patches.site_training_items``) uses a scan only when its label file and
provenance exist, and only the organs in ``organs_fused``: a rejected scan has no label file.

A case is done once its provenance file exists, so an interrupted run resumes where it stopped, and
registrations finished before the interruption come from the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fadal.amplify.fuse import fuse_files, fused_classes
from fadal.amplify.qc import OrganReference, atlas_reference, check_pseudo_label, demote
from fadal.amplify.register import register_many
from fadal.amplify.result import RegistrationResult, registration_failures
from fadal.config import AmplifyConfig
from fadal.data.io import read_image, read_record, write_image, write_record
from fadal.data.site import Case, Site, load_site
from fadal.errors import FadalInputError
from fadal.records import (AmplificationSummary, AtlasUse, CaseSummary, FusionProvenance, OrganStats,
                           RejectedScan)

Progress = Callable[[str, int, int], None]


def _organ_stats(label: np.ndarray, confidence: np.ndarray, names: dict[int, str],
                 organs: list[int]) -> dict[str, OrganStats]:
    stats = {}
    for c in organs:
        m = label == c
        n = int(m.sum())
        stats[names[c]] = OrganStats(voxels=n, mean_confidence=round(float(confidence[m].mean()), 4) if n else None)
    return stats


def _select_atlases(results: list[RegistrationResult], cfg: AmplifyConfig) -> tuple[list[int], dict[int, str]]:
    """Indices of the atlases to fuse (best NCC first, at most ``top_k``) and the reasons the others are not."""
    why: dict[int, str] = {}
    ok = []
    for i, reason in enumerate(registration_failures(results, cfg.registration)):
        if reason is None:
            ok.append(i)
        else:
            why[i] = f"registration failed: {reason}"
    ok.sort(key=lambda i: -results[i].metric_after)
    k = cfg.fusion.top_k or len(ok)
    for i in ok[k:]:
        why[i] = f"not selected: NCC {results[i].metric_after:.3f} outside the best top_k={k}"
    return ok[:k], why


def _atlas_uses(site: Site, atlases: list[Case], results: list[RegistrationResult], chosen: list[int],
                why: dict[int, str]) -> list[AtlasUse]:
    """Each atlas's part in one scan's fusion, with its registration's measures."""
    uses = []
    for i, (atlas, r) in enumerate(zip(atlases, results)):
        status = "used" if i in chosen else "failed" if why[i].startswith("registration") else "not_selected"
        uses.append(AtlasUse(
            case=atlas.case_id, image=str(atlas.image), label=str(atlas.label), annotated=_atlas_organs(site, atlas),
            status=status, reason=why.get(i), warped_label=None if r.warped_label is None else str(r.warped_label),
            metric=r.metric_name, metric_before=_r(r.metric_before), metric_init=_r(r.metric_init),
            metric_after=_r(r.metric_after), body_dice=_r(r.body_dice), overlap=_r(r.overlap),
            init_translation_mm=[round(v, 2) for v in r.init_translation_mm], seconds=r.seconds, cached=r.cached))
    return uses


def _atlas_organs(site: Site, atlas: Case) -> list[str]:
    """The organs an atlas drew, in label order."""
    return [n for n in site.organs if n in atlas.annotated]


def _atlas_ids(site: Site, atlas: Case) -> list[int]:
    return sorted(site.annotated_ids(atlas))


def _amplify_case(site: Site, case: Case, atlases: list[Case], results: list[RegistrationResult], out_dir: Path,
                  cfg: AmplifyConfig, reference: dict[int, OrganReference]) -> FusionProvenance:
    """Select atlases, fuse, check and write one scan's pseudo-label (none if rejected); return its provenance."""
    t0 = time.perf_counter()
    names = {v: n for n, v in site.labels.items()}
    all_organs = [v for v in sorted(names) if v != 0]
    chosen, why = _select_atlases(results, cfg)
    common = dict(case=case.case_id, image=str(case.image), fusion_method=cfg.fusion.method,
                  atlases=_atlas_uses(site, atlases, results, chosen, why),
                  registration_seconds=round(sum(r.seconds for r in results if not r.cached), 3),
                  config=cfg.model_dump(mode="json"))
    label_path, conf_path = out_dir / "labels" / f"{case.case_id}.nii.gz", out_dir / "confidence" / f"{case.case_id}.nii.gz"
    for stale in (label_path, conf_path):  # a rejected re-run must not leave an old pseudo-label behind
        stale.unlink(missing_ok=True)

    if not chosen:
        return FusionProvenance(**common, status="rejected", reasons=[f"all {len(atlases)} atlas registrations failed"],
                                qc=None, organs_fused=[], organs_demoted=[], organs_not_fused=[names[c] for c in all_organs],
                                organs={}, mean_confidence=None, mean_confidence_foreground=None, fusion_seconds=0.0)

    annotated = [_atlas_ids(site, atlases[i]) for i in chosen]
    fused = fused_classes(site.num_classes, annotated, len(chosen))
    reference_img = read_image(case.image)
    label_img, conf_img = fuse_files(
        [results[i].warped_label for i in chosen], reference_img, site.num_classes, annotated, method=cfg.fusion.method,
        image_paths=[results[i].warped_image for i in chosen] if cfg.fusion.method in ("weighted", "joint") else None,
        sigma_hu=cfg.fusion.weight_sigma_hu, radius_mm=cfg.fusion.weight_radius_mm, joint=cfg.fusion.joint_options(),
    )
    lab, conf = sitk.GetArrayFromImage(label_img), sitk.GetArrayFromImage(conf_img)
    voxel_ml = float(np.prod(reference_img.GetSpacing())) / 1000.0
    qc = check_pseudo_label(lab, conf, voxel_ml, fused, reference, names, cfg.qc,
                            image_hu=sitk.GetArrayViewFromImage(reference_img))
    if not qc.accepted:
        return FusionProvenance(**common, status="rejected", reasons=qc.reasons, qc=qc.to_record(names),
                                organs_fused=[], organs_demoted=[], organs_not_fused=[names[c] for c in all_organs],
                                organs=_organ_stats(lab, conf, names, fused), mean_confidence=None,
                                mean_confidence_foreground=None, fusion_seconds=round(time.perf_counter() - t0, 3))

    lab, conf = demote(lab, conf, qc.demoted)
    write_image(_like(lab, reference_img), label_path)
    write_image(_like(conf, reference_img), conf_path)
    fg = lab > 0
    return FusionProvenance(
        **common, status="accepted",
        reasons=qc.reasons,  # organs demoted to unknown, if any
        qc=qc.to_record(names),
        # What training may trust: organs fused and accepted by QC (the others are unknown here).
        organs_fused=[names[c] for c in qc.kept],
        organs_not_fused=[names[c] for c in all_organs if c not in qc.kept],
        organs_demoted=[names[c] for c in qc.demoted],
        organs=_organ_stats(lab, conf, names, qc.kept),
        mean_confidence=round(float(conf.mean()), 4),
        mean_confidence_foreground=round(float(conf[fg].mean()), 4) if fg.any() else None,
        fusion_seconds=round(time.perf_counter() - t0, 3),
    )


def _r(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


def provenance_path(out_dir: Path, case: Case) -> Path:
    return Path(out_dir) / "provenance" / f"{case.case_id}.json"


def amplify_site(site_dir: Path | Site, out_dir: Path, cfg: AmplifyConfig, progress: Progress | None = None
                 ) -> AmplificationSummary:
    """Pseudo-label the unlabeled scans of ``site_dir`` into ``out_dir``; write and return the summary.

    ``site_dir``: a site folder (read and checked here, before anything is written) or a :class:`Site`
    that ``load_site`` read with ``validate=True`` (several sites are all checked before the first runs).

    The first ``cfg.max_atlases`` labeled cases (by case id) are the atlases. Every (scan, atlas)
    pair still to do is registered in one call (:func:`register_pairs`), so all ``workers`` are busy.
    Per scan, atlases whose registration failed (:func:`fadal.amplify.result.registration_failures`,
    judged per scan) are excluded, the best ``cfg.fusion.top_k`` by NCC are fused with ``cfg.fusion.method`` (each atlas
    voting only on the organs it annotated), and the result goes through QC (:mod:`qc`). A scan
    whose atlases all failed, or that QC rejects, gets no label file and is listed under
    ``rejected`` with its reasons. ``progress(stage, done, total)`` is called with stage
    ``"register"`` after each registration and ``"fuse"`` after each scan.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    site = site_dir if isinstance(site_dir, Site) else load_site(site_dir)  # every image and label checked
    if not site.labeled:
        raise FadalInputError(f"{site.root}: no labeled case to use as an atlas (labelsTr is empty)")
    atlases = site.labeled[: cfg.max_atlases]
    todo = [case for case in site.unlabeled if not provenance_path(out_dir, case).exists()]
    results = register_pairs(site, atlases, todo, out_dir, cfg, progress)
    fuse_cases(site, atlases, todo, results, out_dir, cfg, progress)
    summary = summarise_site(site, atlases, out_dir, cfg, results, len(todo), time.perf_counter() - t_start)
    write_record(summary, out_dir / "fusion.json")
    return summary


def register_pairs(site: Site, atlases: list[Case], todo: list[Case], out_dir: Path, cfg: AmplifyConfig,
                   progress: Progress | None) -> list[RegistrationResult]:
    """Register every atlas onto every scan of ``todo``: results scan by scan, atlas by atlas."""
    pairs = [(case.image, atlas.image, atlas.label) for case in todo for atlas in atlases]
    done = [0]

    def on_result(_: RegistrationResult) -> None:
        done[0] += 1
        if progress is not None:
            progress("register", done[0], len(pairs))

    if not pairs:
        return []
    return register_many(pairs, out_dir / "registrations", cfg.registration, on_result, errors="record")


def fuse_cases(site: Site, atlases: list[Case], todo: list[Case], results: list[RegistrationResult], out_dir: Path,
               cfg: AmplifyConfig, progress: Progress | None) -> None:
    """Fuse, check and write each scan of ``todo``; its provenance last (it marks the case done)."""
    if not todo:
        return
    annotated = [_atlas_ids(site, a) for a in atlases]
    reference = atlas_reference([a.label for a in atlases], annotated,
                                fused_classes(site.num_classes, annotated, len(atlases)), [a.image for a in atlases])
    for k, case in enumerate(todo):
        res = results[k * len(atlases): (k + 1) * len(atlases)]
        provenance = _amplify_case(site, case, atlases, res, out_dir, cfg, reference)
        write_record(provenance, provenance_path(out_dir, case))
        if progress is not None:
            progress("fuse", k + 1, len(todo))


def summarise_site(site: Site, atlases: list[Case], out_dir: Path, cfg: AmplifyConfig,
                   results: list[RegistrationResult], n_this_run: int, seconds: float) -> AmplificationSummary:
    """The site's summary over every unlabeled scan (this run's and earlier runs'), from their provenance."""
    per_case: dict[str, CaseSummary] = {}
    organ_conf: dict[str, list[float]] = {}
    for case in site.unlabeled:
        p = read_record(FusionProvenance, provenance_path(out_dir, case), "amplification provenance")
        per_case[case.case_id] = CaseSummary(
            status=p.status, reasons=p.reasons, mean_confidence=p.mean_confidence,
            mean_confidence_foreground=p.mean_confidence_foreground, organs=p.organs if p.accepted else {},
            organs_demoted=p.organs_demoted, seconds=round(p.registration_seconds + p.fusion_seconds, 3))
        for organ, stats in (p.organs if p.accepted else {}).items():
            if stats.mean_confidence is not None:
                organ_conf.setdefault(organ, []).append(stats.mean_confidence)
    rejected = [RejectedScan(case=c, reasons=s.reasons) for c, s in per_case.items() if s.status == "rejected"]
    annotated = [_atlas_ids(site, a) for a in atlases]
    fused_all = fused_classes(site.num_classes, annotated, len(atlases))
    names = {v: n for n, v in site.labels.items()}
    return AmplificationSummary(
        site=str(site.root), n_scans=len(site.unlabeled), n_accepted=len(site.unlabeled) - len(rejected),
        n_rejected=len(rejected), rejected=rejected,
        mean_confidence={o: round(float(np.mean(v)), 4) for o, v in organ_conf.items()},
        n_amplified_this_run=n_this_run, n_atlases=len(atlases), atlases=[a.case_id for a in atlases],
        n_registrations_this_run=sum(1 for r in results if not r.cached and r.error is None),
        # Judged per scan, as fusion judges them (the NCC ratio compares the atlases of one scan).
        n_failed_registrations_this_run=sum(
            why is not None for k in range(0, len(results), len(atlases))
            for why in registration_failures(results[k: k + len(atlases)], cfg.registration)),
        registration_seconds_this_run=round(sum(r.seconds for r in results if not r.cached), 3),
        total_seconds=round(seconds, 3), fusion_method=cfg.fusion.method,
        organs_fused=[names[c] for c in fused_all],
        organs_not_fused=[n for n in site.organs if site.labels[n] not in fused_all],
        per_case=per_case)
