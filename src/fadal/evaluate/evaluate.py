"""Score a model on a site's held-out cases, in each case's own geometry (what a clinician would see)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from fadal.records import Plan
from fadal.data.io import write_image
from fadal.data.site import Case, Site, load_pair, load_site
from fadal.errors import FadalInputError
from fadal.evaluate.metrics import organ_metrics, summarize
from fadal.model.infer import load_checkpoint, predict_image
from fadal.model.net import pick_device


def evaluate_model_on_cases(model: torch.nn.Module, site: Site, cases: Sequence[Case], plan: Plan,
                            device: torch.device, save_dir: Path | None = None,
                            progress: Callable[[str], None] | None = None) -> dict:
    """Predict each case, score only the organs drawn in its reference; optionally keep the predictions."""
    per_case: dict[str, dict] = {}
    for case in cases:
        image, ref = load_pair(site, case)
        pred, _ = predict_image(model, image, plan, device)
        if save_dir is not None:
            write_image(pred, Path(save_dir) / f"{case.case_id}.nii.gz")
        per_case[case.case_id] = organ_metrics(pred, ref, site.labels, organs=case.annotated)
        if progress is not None:
            progress(case.case_id)
    return {"per_case": per_case, "summary": summarize(per_case)}


def evaluate_checkpoint(checkpoint: Path, sites: Sequence[Path], out: Path | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Score a checkpoint on each site's held-out cases (run at each site in a real federation)."""
    model, labels, plan, _ = load_checkpoint(checkpoint)
    results: dict[str, dict] = {}
    for path in sites:
        site = load_site(path)
        if site.labels != labels:
            raise FadalInputError(f"{path}/dataset.json: labels {site.labels} differ from the model's {labels}")
        if not site.test:
            raise FadalInputError(f"{path}: no held-out cases (imagesTs/ + labelsTs/) to evaluate on")
        save = out / "predictions" / site.name if out is not None else None
        results[site.name] = evaluate_model_on_cases(model, site, site.test, plan, pick_device(), save, progress)
    return results
