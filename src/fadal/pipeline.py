"""The one way through the data: load -> amplify -> train/federate -> evaluate -> report.

The CLI commands and the demo call these functions; each writes its results to disk atomically so
that a later stage (or a re-run) can pick them up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fadal.config import AmplifyConfig, FederationConfig, PlannerConfig, SiteSpec, TrainConfig
from fadal.records import AmplificationSummary, FederationHistory, Plan
from fadal.data.io import write_json
from fadal.errors import FadalInputError
from fadal.data.site import load_site
from fadal.model.infer import load_checkpoint, save_checkpoint
from fadal.model.engine import Progress, train_model
from fadal.model.net import pick_device
from fadal.model.patches import site_training_items


def amplify_sites(sites: Sequence[Path], out: Path, cfg: AmplifyConfig,
                  progress: Callable[[object], None] | None = None) -> dict[str, AmplificationSummary]:
    """Amplify each site's labels into ``out/<site folder name>`` (resumable). Every site is read and
    checked before the first is amplified: a bad file stops the run before anything is written."""
    from fadal.amplify.pipeline import amplify_site

    loaded = [load_site(s) for s in sites]
    return {Path(s).name: amplify_site(site, out / Path(s).name, cfg, progress=progress) for s, site in zip(sites, loaded)}


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


def federate(cfg: FederationConfig) -> FederationHistory:
    from fadal.federated.simulation import simulate

    return simulate(cfg)


def federation_report(cfg: FederationConfig, history: FederationHistory, evaluate_sites: bool = True
                      ) -> dict[str, Path] | None:
    """The report of a finished federation, in ``cfg.out`` (report.html/.md, metrics.json).

    ``evaluate_sites`` (simulation: every site's folder is on this machine) scores the global model on
    each site's held-out cases, per organ and per site; under FedBN with the site's own normalisation
    layers. Otherwise (deployment: the coordinator holds no data) the metrics are the federated
    evaluation of the last round: organ Dice averaged over the sites, all that reaches the server.
    None when there is nothing to score (no held-out cases, ``evaluate_every=0``)."""
    import copy

    from fadal.evaluate.evaluate import evaluate_model_on_cases
    from fadal.evaluate.report import write_report

    out = Path(cfg.out)
    name = f"federated ({cfg.strategy})"
    doc: dict | None = None
    if evaluate_sites:
        from fadal.federated.site_task import restore_local_norm
        from fadal.federated.simulation import site_runtimes

        model, labels, plan, _ = load_checkpoint(out / "global_model.pt")
        results: dict[str, dict] = {}
        for runtime in site_runtimes(cfg):
            site = load_site(runtime.data, name=runtime.name)
            if not site.test:
                continue
            site_model = model
            if cfg.strategy == "fedbn":
                site_model = copy.deepcopy(model)
                restore_local_norm(site_model, runtime)
            results[runtime.name] = evaluate_model_on_cases(site_model, site, site.test, plan, pick_device(),
                                                            out / "predictions" / runtime.name)
        if results:
            doc = metrics_document({name: results})
    if doc is None:
        scored = [r for r in history.rounds if r.dice]
        if scored:
            last = scored[-1]
            organs = {o: {"dice": v} for o, v in last.dice.items()}
            doc = {"variants": {name: {f"sites (federated evaluation, round {last.round})": organs}}}
    if doc is None:
        return None
    write_json(doc, out / "metrics.json")
    return write_report(out, doc, history={name: history.report_rounds()}, title=f"FADAL federation: {out.name}")


def evaluate_checkpoint(checkpoint: Path, sites: Sequence[Path], out: Path | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Score a checkpoint on each site's held-out cases (run at each site in a real federation)."""
    from fadal.evaluate.evaluate import evaluate_model_on_cases

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


@dataclass
class ExportOptions:
    """What `fadal predict` writes besides the label map."""

    largest_component: bool = True
    fill_holes: bool = True
    meshes: bool = True
    mesh_formats: tuple[str, ...] = ("stl", "obj", "vtp")
    views: bool = True
    dicom_seg: bool = True  # only for DICOM-series inputs


def predict_case(model: torch.nn.Module, labels: dict[str, int], plan: Plan, source: Path, case_id: str,
                 out: Path, options: ExportOptions | None = None, series_uid: str | None = None) -> dict:
    """Segment one CT and export what navigation needs; ``out/<case>/summary.json`` is written last.

    Outputs: ``out/<case>.nii.gz`` (label map, input geometry), ``out/<case>/meshes/`` (STL/OBJ/VTP in LPS
    mm + meshes.json), ``out/<case>/views/`` (anterior/oblique renders, tri-planar overlay),
    ``out/<case>/seg.dcm`` (DICOM-SEG, DICOM inputs only)."""
    from fadal.data.io import read_image, write_image
    from fadal.model.infer import predict_image

    options = options or ExportOptions()
    case_dir = out / case_id
    timings: dict[str, float] = {}
    t = time.perf_counter()
    image = read_image(source, series_uid)
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    label, _ = predict_image(model, image, plan, pick_device())
    timings["network"] = time.perf_counter() - t
    t = time.perf_counter()
    if options.largest_component or options.fill_holes:
        from fadal.navigation.meshes import postprocess_label

        label = postprocess_label(label, options.largest_component, options.fill_holes)
    write_image(label, out / f"{case_id}.nii.gz")
    outputs: dict[str, object] = {"label": str(out / f"{case_id}.nii.gz")}
    timings["postprocess+write"] = time.perf_counter() - t
    meshes = {}
    if options.meshes or options.views:
        from fadal.navigation.meshes import organ_meshes, write_meshes

        t = time.perf_counter()
        meshes = organ_meshes(label, labels, keep_largest=options.largest_component)
        if options.meshes:
            written = write_meshes(meshes, case_dir / "meshes", formats=options.mesh_formats)
            outputs["meshes"] = {k: [str(p) for p in v] for k, v in written.items()}
        timings["meshes"] = time.perf_counter() - t
    if options.views:
        from fadal.navigation.render import overlay_views, render_views

        t = time.perf_counter()
        views = render_views(meshes, case_dir / "views")
        views["overlay"] = overlay_views(image, label, labels, case_dir / "views" / "overlay.png")
        outputs["views"] = {k: str(v) for k, v in views.items()}
        timings["views"] = time.perf_counter() - t
    if options.dicom_seg and Path(source).is_dir():
        from fadal.navigation.dicom_seg import write_dicom_seg

        t = time.perf_counter()
        outputs["dicom_seg"] = str(write_dicom_seg(label, Path(source), labels, case_dir / "seg.dcm",
                                                   series_uid=series_uid))
        timings["dicom_seg"] = time.perf_counter() - t
    summary = {"case": case_id, "source": str(source), "outputs": outputs, "seconds": timings,
               "organs": sorted(meshes)}
    write_json(summary, case_dir / "summary.json")
    return summary


def metrics_document(variants: dict[str, dict[str, dict]]) -> dict:
    """``{variant: {site: evaluate-result}}`` -> the report's metrics format."""
    return {
        "variants": {v: {s: r["summary"] for s, r in sites.items()} for v, sites in variants.items()},
        "per_case": {v: {s: r["per_case"] for s, r in sites.items()} for v, sites in variants.items()},
    }


def write_run_report(out: Path, metrics: dict, history: dict | None = None, amplification: dict | None = None,
                     title: str = "FADAL report", overlays: list[tuple[Path, str]] | None = None,
                     viewer: str | None = None) -> dict[str, Path]:
    from fadal.evaluate.report import write_report

    write_json(metrics, out / "metrics.json")
    if history is not None:
        write_json(history, out / "history.json")
    return write_report(out, metrics, history=history, amplification=amplification, overlays=overlays,
                        viewer=viewer, title=title)


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def device_summary() -> str:
    dev = pick_device()
    if dev.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(0)}), mixed precision"
    return f"CPU ({torch.get_num_threads()} threads)"
