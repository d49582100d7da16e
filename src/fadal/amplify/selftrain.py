"""Self-training with quality control: the network refines the pseudo-labels it was trained on.

Why: multi-atlas fusion is wrong where registration fails (thin or mobile organs, unusual anatomy);
a network trained on many scans is wrong elsewhere. Where the two agree, the label is much more
likely right than either alone; where the network is very sure, it has usually learned something
the atlases could not show. One round:

1. train on the real labels + the current pseudo-labels (+ synthetic pairs, if given);
2. predict every unlabeled scan (label and max class probability, on the scan's own grid);
3. refine (:func:`refine_label`), per voxel: model and fusion agree -> keep (confidence 1); they
   disagree but the model's probability >= ``model_confidence`` -> the model's label (confidence =
   that probability); otherwise the voxel is dropped (confidence 0: the loss ignores it);
4. quality control of the refined label (:func:`check_refined`: an organ that drifted far from the
   fusion goes back to the fusion's version of it; then the amplification's own QC,
   :mod:`fadal.amplify.qc`) and write it, in the layout of `fadal amplify`
   (``labels/``, ``confidence/``, ``provenance/`` with ``"qc"``/``"status"``), so the next round and
   ``fadal train --amplified`` read it like any amplification;
5. retrain (a fresh network by default, so the previous weights' mistakes are not simply kept).

Partial annotations: only organs the fusion produced (``organs_fused`` in its
:class:`~fadal.records.FusionProvenance`; without fusion, the organs the site's labeled cases drew)
are *known* in a refined label. A model prediction
of any other organ becomes 0 there and, that organ being unknown, the partial-label loss treats the 0
as "background or that organ", never as plain background.

QC: a scan whose amplification was rejected (its provenance's ``status``) is not refined. A refined
label that QC rejects is written (for inspection) with a :class:`~fadal.records.SelfTrainProvenance`
marked rejected, and training skips it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from fadal.amplify.qc import OrganReference, atlas_reference, check_pseudo_label, demote
from fadal.config import SelfTrainConfig, TrainConfig
from fadal.data.io import (read_image, read_record, resample_like, same_geometry, write_image, write_json,
                           write_record)
from fadal.data.site import Site
from fadal.model.engine import train_model
from fadal.model.infer import predict_image, save_checkpoint
from fadal.model.net import pick_device
from fadal.model.patches import amplified_known, provenance_qc_accepted, read_provenance, site_training_items
from fadal.records import Plan, Provenance, RefinedQC, SelfTrainProvenance


@dataclass
class SelfTrainSite:
    """One site's share of self-training (everything here stays at the site)."""

    site: Site
    amplified: Path | None = None  # `fadal amplify` output: labels/, confidence/, provenance/
    synthetic: torch.utils.data.Dataset | None = None  # e.g. a SyntheticPairs sampler


@dataclass
class SelfTrainResult:
    model: torch.nn.Module
    rounds: list[dict] = field(default_factory=list)
    label_dirs: list[dict[str, Path]] = field(default_factory=list)  # per round: site name -> refined outputs


def refine_label(model_label: np.ndarray, model_conf: np.ndarray, known: Sequence[int],
                 fused_label: np.ndarray | None = None, model_confidence: float = 0.9
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(refined label uint8, confidence float32, stats) by the rule in the module docstring.

    ``model_label``/``model_conf``: the network's argmax and max probability; ``known``: organ ids
    this pseudo-label may contain; ``fused_label``: the fusion's label (None: model-only rule, keep
    where the model's probability >= ``model_confidence``).
    """
    model_label = np.where(np.isin(model_label, list(known)), model_label, 0).astype(np.uint8)
    sure = model_conf >= model_confidence
    if fused_label is None:
        label = model_label
        conf = np.where(sure, model_conf, 0.0)
        agree = np.zeros_like(sure)
    else:
        agree = model_label == fused_label
        take_model = ~agree & sure
        label = np.where(agree | take_model, model_label, fused_label).astype(np.uint8)
        conf = np.where(agree, 1.0, np.where(take_model, model_conf, 0.0))
    n = max(model_label.size, 1)
    stats = {
        "agree_fraction": round(float(agree.sum()) / n, 4),
        "model_only_fraction": round(float((~agree & sure).sum()) / n, 4),
        "dropped_fraction": round(float((conf == 0).sum()) / n, 4),
    }
    return label, conf.astype(np.float32), stats


def check_refined(label: np.ndarray, conf: np.ndarray, known: Sequence[int], names: dict[int, str],
                  fused_label: np.ndarray | None, cfg: SelfTrainConfig,
                  reference: dict[int, OrganReference] | None = None, voxel_ml: float = 1.0,
                  fused_conf: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, RefinedQC]:
    """QC of a refined label -> (label, confidence, verdict).

    First *drift*: an organ whose kept volume leaves [``min_volume_ratio``, ``max_volume_ratio``] x its
    fused volume on the same scan has more likely gone wrong in the network than found the truth, so
    it goes back to the fusion's version (fused voxels with the fusion's confidence, ``fused_conf``, 1
    without it; voxels the network alone gave it are dropped). Why not make it unknown: the organs a
    young network misses entirely (a thin cord, a small larynx) are exactly those it still needs the
    atlases' labels for; dropping them made self-training *lose* those organs (measured: the spinal
    cord and a parotid went to 0 Dice in benchmarks/label_efficiency.py). Then the amplification's
    own checks (:func:`fadal.amplify.qc.check_pseudo_label`: volume against the site's atlases,
    fragmentation, missing, low confidence): an organ they flag is demoted to unknown (label 0,
    confidence 0, out of ``kept``); the scan is rejected when more than
    ``cfg.qc.max_flagged_fraction`` of its organs are flagged or none is left (the amplification's rule).
    """
    reasons, reverted = [], []
    label, conf = label.copy(), conf.copy()
    if fused_label is not None:
        for c in known:
            f = int((fused_label == c).sum())
            if f == 0:
                continue
            ratio = int(((label == c) & (conf > 0)).sum()) / f
            if not cfg.min_volume_ratio <= ratio <= cfg.max_volume_ratio:
                reverted.append(c)
                reasons.append(f"{names.get(c, c)}: refined/fused volume {ratio:.2f} outside "
                               f"[{cfg.min_volume_ratio:g}, {cfg.max_volume_ratio:g}]; fusion's label kept")
                extra = (label == c) & (fused_label != c)
                label[extra], conf[extra] = fused_label[extra], 0.0
                was = fused_label == c
                label[was] = c
                conf[was] = 1.0 if fused_conf is None else fused_conf[was]
    amp = check_pseudo_label(label, conf, voxel_ml, list(known), reference or {}, names, cfg.qc)
    demoted = [c for c in known if c not in amp.kept]
    kept = [c for c in known if c in amp.kept]
    reasons += amp.reasons
    accepted = amp.accepted and bool(kept) and len(demoted) / max(len(known), 1) <= cfg.qc.max_flagged_fraction
    if not accepted and not reasons:
        reasons.append("no organ left")
    label, conf = demote(label, conf, demoted)
    verdict = RefinedQC(accepted=accepted, reasons=reasons, kept=[names.get(c, str(c)) for c in kept],
                        demoted=[names.get(c, str(c)) for c in demoted],
                        reverted=[names.get(c, str(c)) for c in reverted], organs=amp.organs,
                        checker="fadal.amplify.selftrain.check_refined (drift -> fusion + fadal.amplify.qc)")
    return label, conf, verdict


def _known_organs(sts: SelfTrainSite, provenance: Provenance | None) -> list[int]:
    site = sts.site
    if provenance is not None:
        return amplified_known(provenance, site)
    return sorted({i for c in site.labeled for i in site.annotated_ids(c)})


def _on_scan(img: sitk.Image | None, scan: sitk.Image, is_label: bool) -> np.ndarray | None:
    """A fusion output as an array on the scan's own grid (resampled only if its geometry differs)."""
    if img is None:
        return None
    if same_geometry(img, scan) is not None:
        img = resample_like(img, scan, is_label=is_label)
    arr = sitk.GetArrayFromImage(img)
    return arr if is_label else arr.astype(np.float32)


def refine_site(model: torch.nn.Module, sts: SelfTrainSite, out_dir: Path, plan: Plan,
                cfg: SelfTrainConfig, round_no: int = 1, device: torch.device | None = None,
                resume: bool = False) -> dict:
    """Predict, refine, check and write every unlabeled scan of one site; return a summary.

    ``resume``: a scan whose provenance is already in ``out_dir`` (written last) is not redone; only
    for a folder that the same model and settings write (the caller keys it)."""
    site, out_dir = sts.site, Path(out_dir)
    names = {v: k for k, v in site.labels.items()}
    device = device or pick_device()
    # What the site's own labeled scans say each organ looks like (volumes, parts): the QC reference.
    reference = atlas_reference([c.label for c in site.labeled], [site.annotated_ids(c) for c in site.labeled],
                                [v for v in site.labels.values() if v != 0])
    per_case: dict[str, dict] = {}
    for case in site.unlabeled:
        t0 = time.perf_counter()
        done = out_dir / "provenance" / f"{case.case_id}.json"
        if resume and done.exists():
            prov = read_record(SelfTrainProvenance, done, "self-training provenance")
            per_case[case.case_id] = {"qc": prov.accepted, "reasons": prov.reasons, **prov.stats}
            continue
        prov_in, fused_img, fused_conf_img = None, None, None
        if sts.amplified is not None:
            p = Path(sts.amplified) / "provenance" / f"{case.case_id}.json"
            if p.exists():
                prov_in = read_provenance(p)
                if not provenance_qc_accepted(prov_in):
                    per_case[case.case_id] = {"skipped": "fusion QC rejected this scan"}
                    continue
                lab_path = Path(sts.amplified) / "labels" / f"{case.case_id}.nii.gz"
                fused_img = read_image(lab_path) if lab_path.exists() else None
                conf_path = Path(sts.amplified) / "confidence" / f"{case.case_id}.nii.gz"
                fused_conf_img = read_image(conf_path) if fused_img is not None and conf_path.exists() else None
        image = read_image(case.image)
        pred, pconf = predict_image(model, image, plan, device)
        fused = _on_scan(fused_img, image, is_label=True)
        fused_conf = _on_scan(fused_conf_img, image, is_label=False)
        known = _known_organs(sts, prov_in)
        label, conf, stats = refine_label(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(pconf), known,
                                          fused, cfg.model_confidence)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        label, conf, qc = check_refined(label, conf, known, names, fused, cfg, reference, voxel_ml, fused_conf)
        for sub, arr in (("labels", label), ("confidence", conf)):
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(image)  # exactly the scan's geometry
            write_image(img, out_dir / sub / f"{case.case_id}.nii.gz")
        prov = SelfTrainProvenance(
            case=case.case_id, image=str(case.image), round=round_no,
            fusion=str(sts.amplified) if fused is not None else None,
            status="accepted" if qc.accepted else "rejected", reasons=qc.reasons,
            # What training may trust: organs known here and kept by QC (demoted ones are unknown).
            organs_fused=qc.kept, organs_demoted=qc.demoted, organs_reverted=qc.reverted,
            rule={"model_confidence": cfg.model_confidence},
            stats=stats, qc=qc, seconds=round(time.perf_counter() - t0, 3),
        )
        write_record(prov, out_dir / "provenance" / f"{case.case_id}.json")  # last: marks the case done
        per_case[case.case_id] = {"qc": qc.accepted, "reasons": qc.reasons, **stats}
    summary = {"site": site.name, "round": round_no, "per_case": per_case,
               "accepted": sum(1 for v in per_case.values() if v.get("qc")), "scans": len(site.unlabeled)}
    write_json(summary, out_dir / "selftrain.json")
    return summary


def selftrain(sites: Sequence[SelfTrainSite], out: Path, train_cfg: TrainConfig, plan: Plan,
              cfg: SelfTrainConfig, steps: int | None = None, model: torch.nn.Module | None = None,
              log: Callable[[str], None] | None = None) -> SelfTrainResult:
    """``cfg.rounds`` rounds of predict -> refine -> retrain over ``sites`` (pooled training).

    Without ``model``, round 0 trains one on the real labels + the sites' fused pseudo-labels (QC-
    accepted) + synthetic pairs. Refined labels go to ``out/round_<r>/<site name>/``; the final
    network to ``out/model.pt``.
    """
    out = Path(out)
    log = log or (lambda _: None)
    labels = sites[0].site.labels
    num_classes = max(labels.values()) + 1
    extra = [s.synthetic for s in sites if s.synthetic is not None]
    history: list[dict] = []
    if model is None:
        items = [it for s in sites for it in site_training_items(s.site, s.amplified, s.amplified is not None)]
        model, res = train_model(items, plan, train_cfg, num_classes, steps, extra)
        history.append({"round": 0, "items": len(items), "loss": res.loss, "steps": res.steps, "seconds": res.seconds})
        log(f"self-training round 0: trained on {len(items)} items, loss {res.loss:.3f}")
    dirs: list[dict[str, Path]] = []
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        round_dirs = {s.site.name: out / f"round_{r}" / s.site.name for s in sites}
        refined = {s.site.name: refine_site(model, s, round_dirs[s.site.name], plan, cfg, r) for s in sites}
        t_refine = time.perf_counter() - t0
        items = [it for s in sites for it in site_training_items(s.site, round_dirs[s.site.name], True)]
        model, res = train_model(items, plan, train_cfg, num_classes, steps, extra,
                                 model=None if cfg.fresh_model else model)
        history.append({"round": r, "items": len(items), "loss": res.loss, "steps": res.steps,
                        "seconds": res.seconds, "refine_seconds": round(t_refine, 2),
                        "accepted": {k: v["accepted"] for k, v in refined.items()},
                        "scans": {k: v["scans"] for k, v in refined.items()}})
        dirs.append(round_dirs)
        log(f"self-training round {r}: refined in {t_refine:.0f} s, trained on {len(items)} items, loss {res.loss:.3f}")
    save_checkpoint(model, out / "model.pt", labels, plan, train_cfg, {"selftrain": history})
    write_json({"rounds": history}, out / "history.json")
    return SelfTrainResult(model, history, dirs)
