"""Score a model on a site's held-out cases, in each case's own geometry (what a clinician would see)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from fadal.records import Plan
from fadal.data.io import write_image
from fadal.data.site import Case, Site, load_pair
from fadal.evaluate.metrics import organ_metrics, summarize
from fadal.model.infer import predict_image


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
