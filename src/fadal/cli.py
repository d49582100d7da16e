"""`fadal`: the command line. Each command wires stages from :mod:`fadal.pipeline` together."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fadal.data.io import FadalInputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="FADAL: federated few-label 3D CT organ segmentation (amplify labels at each site, "
                       "train one model across sites with Flower, evaluate and export).")
console = Console()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def phantom(
    out: Path = typer.Option(Path("phantom"), help="Folder to write site_A, site_B, ... into."),
    sites: int = typer.Option(3, min=1, help="Number of hospitals (scanner profiles)."),
    labeled: int = typer.Option(3, min=1, help="Labeled training scans per site."),
    unlabeled: int = typer.Option(6, min=0, help="Unlabeled training scans per site."),
    test: int = typer.Option(3, min=0, help="Held-out labeled test scans per site."),
    partial_sites: int = typer.Option(1, min=0, help="Sites (counted from the last) whose labels omit some organs."),
    seed: int = typer.Option(0, help="Random seed (same seed, same data)."),
) -> None:
    """Write the synthetic multi-site abdominal CT phantom (the embedded default data)."""
    from fadal.data.phantom import make_phantom

    paths = make_phantom(out, sites=sites, labeled=labeled, unlabeled=unlabeled, test=test, seed=seed,
                         partial_sites=partial_sites)
    for p in paths:
        console.print(f"wrote {p}")


@app.command()
def amplify(
    site: list[Path] = typer.Option(..., help="Site folder(s) (nnU-Net v2 or MSD layout); repeat for several."),
    out: Path = typer.Option(Path("amplified"), help="Output root; each site gets out/<site folder name>/."),
    config: Optional[Path] = typer.Option(None, help="Amplification YAML (see fadal.config.AmplifyConfig)."),
) -> None:
    """Turn each site's few labels into many: register atlases onto unlabeled scans and fuse labels.

    Resumable: finished registrations and cases are not redone on a re-run."""
    from fadal.config import AmplifyConfig, load_yaml
    from fadal.pipeline import amplify_sites

    try:
        cfg = load_yaml(AmplifyConfig, config) if config else AmplifyConfig()
        with _progress() as prog:
            task = prog.add_task("registrations", total=None)
            summary = amplify_sites(site, out, cfg, progress=lambda *_: prog.advance(task))
    except FadalInputError as err:
        _fail(err)
    for name, s in summary.items():
        console.print(f"{name}: {s.get('n_unlabeled', '?')} scans amplified in {s.get('seconds', 0):.1f} s -> {out / name}")


@app.command()
def train(
    site: list[Path] = typer.Option(..., help="Site folder(s); several = pooled (centralised) training."),
    out: Path = typer.Option(Path("runs/train"), help="Where model.pt and history.json go."),
    amplified: Optional[Path] = typer.Option(None, help="Amplification output root (out of `fadal amplify`)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default from the config)."),
    config: Optional[Path] = typer.Option(None, help="Training YAML (fadal.config.TrainConfig)."),
) -> None:
    """Train one model on one site's data (local) or several sites pooled (centralised upper bound)."""
    from fadal.config import PreprocessConfig, SiteSpec, TrainConfig, load_yaml
    from fadal.pipeline import train_centralised

    try:
        cfg = load_yaml(TrainConfig, config) if config else TrainConfig()
        specs = [SiteSpec(name=s.name, data=s, amplified=(amplified / s.name) if amplified else None,
                          use_amplified=amplified is not None) for s in site]
        total = epochs or cfg.epochs
        with _progress() as prog:
            task = prog.add_task("epochs", total=total)
            ckpt = train_centralised(specs, out, cfg, PreprocessConfig(), epochs=total,
                                     on_epoch=lambda e, loss: prog.update(task, advance=1, description=f"loss {loss:.3f}"))
    except FadalInputError as err:
        _fail(err)
    console.print(f"model: {ckpt}")


@app.command()
def federate(
    config: Path = typer.Option(..., help="Federation YAML (fadal.config.FederationConfig): sites, rounds, strategy."),
    deployment: bool = typer.Option(False, help="Submit to a running SuperLink instead of simulating (not yet available)."),
) -> None:
    """Train one model across sites with Flower (simulation engine on this machine).

    Each site's ClientApp reads only its own folder; only model arrays and scalar metrics travel."""
    from fadal.config import FederationConfig, load_yaml
    from fadal.pipeline import federate as run

    if deployment:
        _fail(FadalInputError("--deployment is not implemented yet; use the simulation engine"))
    try:
        cfg = load_yaml(FederationConfig, config)
        history = run(cfg)
    except FadalInputError as err:
        _fail(err)
    _print_history(history["rounds"])
    console.print(f"global model: {cfg.out / 'global_model.pt'}; checkpoints in {cfg.out / 'checkpoints'}")


def _print_history(rounds: list[dict]) -> None:
    table = Table(title="federated rounds")
    for col in ("round", "loss", "mean Dice (sites)", "seconds"):
        table.add_column(col)
    for r in rounds:
        dice = (r.get("dice") or {}).get("mean")
        table.add_row(str(r["round"]), f"{r.get('loss', float('nan')):.3f}", "–" if dice is None else f"{dice:.3f}",
                      f"{r.get('seconds', 0):.1f}")
    console.print(table)


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="NIfTI file(s), folder(s) of NIfTI files, or DICOM series folder(s)."),
    model: Path = typer.Option(..., help="Checkpoint (model.pt / global_model.pt)."),
    out: Path = typer.Option(Path("predictions"), help="Output folder: <case>.nii.gz label maps in the input's geometry."),
) -> None:
    """Segment CT volumes; label maps are written on each input's exact voxel grid."""
    import torch

    from fadal.data.io import read_image, write_image
    from fadal.model.infer import load_checkpoint, predict_image
    from fadal.model.net import pick_device

    try:
        net, labels, pre, _ = load_checkpoint(model)
        files = _expand_inputs(inputs)
        device = pick_device()
        with _progress() as prog:
            task = prog.add_task("cases", total=len(files))
            for case_id, path in files:
                target = out / f"{case_id}.nii.gz"
                if target.exists() and target.stat().st_mtime > path.stat().st_mtime:
                    prog.advance(task)
                    continue
                label, _ = predict_image(net, read_image(path), pre, device)
                write_image(label, target)
                prog.advance(task)
    except FadalInputError as err:
        _fail(err)
    console.print(f"{len(files)} label maps in {out} (labels: {labels})")


def _expand_inputs(inputs: list[Path]) -> list[tuple[str, Path]]:
    from fadal.data.site import IMAGE_SUFFIXES, _strip_suffix

    found: list[tuple[str, Path]] = []
    for p in inputs:
        if not p.exists():
            raise FadalInputError(f"{p}: not found")
        if p.is_dir():
            vols = sorted(f for f in p.iterdir() if f.name.endswith(IMAGE_SUFFIXES))
            if vols:
                found += [(_strip_suffix(f.name).removesuffix("_0000"), f) for f in vols]
            else:  # a DICOM series folder
                found.append((p.name, p))
        else:
            found.append((_strip_suffix(p.name).removesuffix("_0000"), p))
    return found


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="Checkpoint to evaluate."),
    site: list[Path] = typer.Option(..., help="Site folder(s) with held-out cases in imagesTs/ + labelsTs/."),
    out: Path = typer.Option(Path("runs/evaluate"), help="metrics.json, report.html and predictions go here."),
    name: str = typer.Option("model", help="Name of this model in tables."),
) -> None:
    """Dice, HD95 and surface Dice per organ per site; writes metrics.json and an HTML/Markdown report."""
    from fadal.pipeline import evaluate_checkpoint, load_json, metrics_document, write_run_report

    try:
        results = evaluate_checkpoint(model, site, out)
    except FadalInputError as err:
        _fail(err)
    doc = metrics_document({name: results})
    history = load_json(model.parent / "history.json")
    paths = write_run_report(out, doc, history={name: history["rounds"]} if history else None)
    _print_comparison(doc)
    console.print(f"report: {paths['html']}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A folder with metrics.json (and optionally history.json).")) -> None:
    """(Re)build report.html / report.md from a run folder's metrics."""
    from fadal.evaluate.report import write_report
    from fadal.pipeline import load_json

    metrics = load_json(run_dir / "metrics.json")
    if metrics is None:
        _fail(FadalInputError(f"{run_dir}: no metrics.json (run `fadal evaluate` first)"))
    paths = write_report(run_dir, metrics, history=load_json(run_dir / "history.json"))
    console.print(f"report: {paths['html']}")


def _print_comparison(metrics: dict, title: str = "Dice per site and organ") -> None:
    from fadal.evaluate.report import comparison_table

    rows = comparison_table(metrics, "dice")
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col)
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Everything the demo makes goes here."),
    quick: bool = typer.Option(False, help="Tiny settings (seconds, for tests), not meaningful numbers."),
    rounds: Optional[int] = typer.Option(None, help="Override the number of federated rounds."),
) -> None:
    """Run phantom -> amplify -> local / federated / federated+amplified training -> evaluate -> report."""
    from dataclasses import replace

    from fadal.demo import QUICK, DemoSettings, run_demo
    from fadal.pipeline import device_summary

    settings = QUICK if quick else DemoSettings()
    if rounds:
        settings = replace(settings, rounds=rounds)
    console.print(f"device: {device_summary()}")
    try:
        result = run_demo(out, settings, log=console.print)
    except FadalInputError as err:
        _fail(err)
    _print_comparison(result["metrics"], "Mean Dice on held-out scans: local vs federated vs federated+amplified")
    console.print(f"total {result['timings']['total']:.0f} s; report: {result['report']['html']}")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
