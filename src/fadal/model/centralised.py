"""Training on the pooled data of one or more sites: the local-only baseline (one site) and the centralised
upper bound (several), with the same engine and plan as a federation, written where `fadal evaluate` reads it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from fadal.config import PlannerConfig, SiteSpec, TrainConfig
from fadal.data.io import write_json
from fadal.data.site import load_site
from fadal.errors import FadalInputError
from fadal.model.engine import Progress, train_model
from fadal.model.infer import save_checkpoint
from fadal.model.patches import site_training_items
from fadal.records import Plan


def train_centralised(sites: Sequence[SiteSpec], out: Path, train_cfg: TrainConfig, plan: Plan | None = None,
                      planner: PlannerConfig | None = None, steps: int | None = None, minutes: float | None = None,
                      progress: Progress | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train one model on the pooled data of ``sites`` (one site = local-only training).

    Without a ``plan``, the sites' fingerprints are measured and planned (``planner``); the plan goes into
    the checkpoint and ``out/plan.json``."""
    loaded = [load_site(s.data, name=s.name) for s in sites]
    labels = loaded[0].labels
    for site in loaded[1:]:
        if site.labels != labels:
            raise FadalInputError(f"{site.root}: label set differs from {loaded[0].root}; pooled training needs one label set")
    items = [it for spec, site in zip(sites, loaded) for it in site_training_items(site, spec.amplified, spec.use_amplified)]
    if not items:
        raise FadalInputError(f"no labeled training cases in {[str(s.data) for s in sites]}")
    if plan is None:
        from fadal.plan.planner import plan_for_sites

        plan = plan_for_sites(loaded, planner)
    out.mkdir(parents=True, exist_ok=True)
    write_json(plan.model_dump(mode="json"), out / "plan.json")
    if log is not None:
        log(f"plan: spacing {plan.preprocess.spacing_mm} mm, patch {plan.patch_size} x {plan.batch_size}, "
            f"{plan.network.architecture} {plan.network.channels}")
    num_classes = max(labels.values()) + 1
    curve: list[dict] = []  # the report's training curve: mean loss per stretch of steps ("round" = step)
    every = max(1, (steps or train_cfg.steps) // 50) if not (minutes or train_cfg.minutes) else 25
    window: list[float] = []

    def record(step: int, total: int, loss: float, elapsed: float) -> None:
        window.append(loss)
        if step % every == 0:
            curve.append({"round": step, "loss": sum(window) / len(window), "seconds": round(elapsed, 1)})
            window.clear()
        if progress is not None:
            progress(step, total, loss, elapsed)

    start = time.perf_counter()
    model, result = train_model(items, plan, train_cfg, num_classes, steps=steps, minutes=minutes, progress=record)
    ckpt = save_checkpoint(model, out / "model.pt", labels, plan, train_cfg,
                           {"sites": [s.name for s in sites], "examples": len(items)})
    write_json({"rounds": curve, "seconds": time.perf_counter() - start, "train_seconds": result.seconds,
                "steps": result.steps, "loss": result.loss, "stopped_by": result.stopped_by, "examples": len(items)},
               out / "history.json")
    return ckpt
