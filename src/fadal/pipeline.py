"""The one way through the data: load -> amplify -> train/federate -> evaluate -> report.

The CLI commands and the demo call these functions; each writes its results to disk atomically so
that a later stage (or a re-run) can pick them up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from fadal.config import AmplifyConfig, FederationConfig, PreprocessConfig, SiteSpec, TrainConfig
from fadal.data.io import FadalInputError, write_json
from fadal.data.site import Site, load_site
from fadal.model.infer import load_checkpoint, save_checkpoint
from fadal.model.net import build_network, pick_device
from fadal.model.train import make_loader, seed_everything, site_training_items, train_epochs


def amplify_sites(sites: Sequence[Path], out: Path, cfg: AmplifyConfig,
                  progress: Callable[[object], None] | None = None) -> dict[str, dict]:
    """Amplify each site's labels into ``out/<site folder name>`` (resumable)."""
    from fadal.amplify.pipeline import amplify_site

    return {Path(s).name: amplify_site(Path(s), out / Path(s).name, cfg, progress=progress) for s in sites}


def train_centralised(sites: Sequence[SiteSpec], out: Path, train_cfg: TrainConfig, pre: PreprocessConfig,
                      epochs: int | None = None, on_epoch: Callable[[int, float], None] | None = None) -> Path:
    """Train one model on the pooled data of ``sites`` (one site = local-only training)."""
    seed_everything(train_cfg.seed, train_cfg.num_threads)
    loaded = [load_site(s.data, name=s.name) for s in sites]
    labels = loaded[0].labels
    for site in loaded[1:]:
        if site.labels != labels:
            raise FadalInputError(f"{site.root}: label set differs from {loaded[0].root}; pooled training needs one label set")
    items = [it for spec, site in zip(sites, loaded) for it in site_training_items(site, spec.amplified, spec.use_amplified)]
    if not items:
        raise FadalInputError(f"no labeled training cases in {[str(s.data) for s in sites]}")
    num_classes = max(labels.values()) + 1
    model = build_network(num_classes, train_cfg)
    loader = make_loader(items, pre, num_classes, train_cfg.batch_size)
    history: list[dict] = []

    def log_epoch(epoch: int, loss: float) -> None:
        history.append({"round": epoch + 1, "loss": loss})
        if on_epoch is not None:
            on_epoch(epoch, loss)

    start = time.perf_counter()
    result = train_epochs(model, loader, train_cfg, epochs or train_cfg.epochs, pick_device(), on_epoch=log_epoch)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(model, out / "model.pt", labels, train_cfg, pre,
                           {"sites": [s.name for s in sites], "examples": len(items)})
    write_json({"rounds": history, "seconds": time.perf_counter() - start, "steps": result.steps,
                "examples": len(items)}, out / "history.json")
    return ckpt


def federate(cfg: FederationConfig) -> dict:
    from fadal.federated.simulation import simulate

    return simulate(cfg)


def evaluate_checkpoint(checkpoint: Path, sites: Sequence[Path], out: Path | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Score a checkpoint on each site's held-out cases (run at each site in a real federation)."""
    from fadal.evaluate.evaluate import evaluate_model_on_cases

    model, labels, pre, _ = load_checkpoint(checkpoint)
    results: dict[str, dict] = {}
    for path in sites:
        site = load_site(path)
        if site.labels != labels:
            raise FadalInputError(f"{path}/dataset.json: labels {site.labels} differ from the model's {labels}")
        if not site.test:
            raise FadalInputError(f"{path}: no held-out cases (imagesTs/ + labelsTs/) to evaluate on")
        save = out / "predictions" / site.name if out is not None else None
        results[site.name] = evaluate_model_on_cases(model, site, site.test, pre, pick_device(), save, progress)
    return results


def metrics_document(variants: dict[str, dict[str, dict]]) -> dict:
    """``{variant: {site: evaluate-result}}`` -> the report's metrics format."""
    return {
        "variants": {v: {s: r["summary"] for s, r in sites.items()} for v, sites in variants.items()},
        "per_case": {v: {s: r["per_case"] for s, r in sites.items()} for v, sites in variants.items()},
    }


def write_run_report(out: Path, metrics: dict, history: dict | None = None, amplification: dict | None = None,
                     title: str = "FADAL report") -> dict[str, Path]:
    from fadal.evaluate.report import write_report

    write_json(metrics, out / "metrics.json")
    if history is not None:
        write_json(history, out / "history.json")
    return write_report(out, metrics, history=history, amplification=amplification, title=title)


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def device_summary() -> str:
    dev = pick_device()
    if dev.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(0)}), mixed precision"
    return f"CPU ({torch.get_num_threads()} threads)"
