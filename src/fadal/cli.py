"""`fadal`: the command line. Each command wires stages together (data, plan, amplify, model, federated, evaluate,
navigation); the deployment roles are the sub-app in cli_deploy.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from fadal.cli_deploy import deploy_app, submit_federation
from fadal.cli_navigation import navigation_app
from fadal.errors import FadalInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="FADAL: federated few-label 3D CT organ segmentation (amplify labels at each site, "
                       "train one model across sites with Flower, evaluate and export).")
# The deployment roles (site-keys, certs, server, site): a typer sub-app added without a group name, so that they stay
# `fadal certs`, `fadal server`, `fadal site`.
app.add_typer(deploy_app)
# `fadal predict`, `fadal export`, `fadal serve`: inference and what a hospital deploys (cli_navigation.py).
app.add_typer(navigation_app)
console = Console()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


class _Bar:
    """A progress bar shown from its first update on: a command whose inputs are checked before any work
    (a bad file) ends with its error line alone, not an empty bar above it."""

    def __init__(self, description: str, total: float | None = None) -> None:
        self.description, self.total = description, total
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, **fields) -> None:
        """``rich.progress.Progress.update`` of the bar's task (``advance=``, ``completed=``, ``description=``)."""
        if self._progress is None:
            self._progress = _progress()
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        self._progress.update(self._task, **fields)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
    raise typer.Exit(2)


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


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
    config: Optional[Path] = typer.Option(None, help="Amplification YAML (fadal.config.AmplifyConfig): registration, "
                                          "fusion, QC, and the optional synthesis and selftrain stages."),
) -> None:
    """Turn each site's few labels into many: multi-atlas fusion, then (as configured) synthesis of new
    labeled pairs and self-training with QC. Per stage, what was made, accepted and rejected goes to
    out/<site>/amplification.json.

    Resumable: finished registrations, scans, transforms and self-training runs are not redone."""
    from fadal.amplify.chain import amplify_sites
    from fadal.config import AmplifyConfig, load_yaml

    try:
        cfg = load_yaml(AmplifyConfig, config) if config else AmplifyConfig()
        with _Bar("registrations") as bar:
            reports = amplify_sites(site, out, cfg, progress=lambda *_: bar.update(advance=1), log=console.print)
    except FadalInputError as err:
        _fail(err)
    for name, r in reports.items():
        f = r.fusion
        line = (f"{name}: fusion {f.n_accepted}/{f.n_scans} scans accepted ({f.n_registrations_this_run} new "
                f"registrations, {f.total_seconds:.1f} s)")
        if r.synthesis is not None:
            line += f"; synthesis {r.synthesis.transforms_kept} transforms kept, {len(r.synthesis.transforms_rejected)} rejected"
        if r.selftrain is not None:
            last = r.selftrain.rounds[-1]
            line += f"; self-training round {last['round']}: {last['accepted']}/{last['scans']} accepted"
        console.print(f"{line} -> {out / name} (training reads {r.training_labels})")


@app.command()
def plan(
    site: list[Path] = typer.Option(..., help="Site folder(s) whose fingerprints are merged."),
    out: Path = typer.Option(Path("plan.json"), help="Where the plan is written (JSON; editable, validated on use)."),
    config: Optional[Path] = typer.Option(None, help="Planner YAML (fadal.config.PlannerConfig): budget, overrides."),
) -> None:
    """Measure each site's fingerprint (aggregate statistics) and plan spacing, patch, network and normalisation."""
    from fadal.config import PlannerConfig, load_yaml
    from fadal.data.io import write_json
    from fadal.data.site import load_site
    from fadal.plan.planner import plan_for_sites

    try:
        cfg = load_yaml(PlannerConfig, config) if config else PlannerConfig()
        the_plan = plan_for_sites([load_site(s, validate=False) for s in site], cfg)
    except FadalInputError as err:
        _fail(err)
    write_json(the_plan.model_dump(mode="json"), out)
    table = Table(title=f"plan ({out})")
    table.add_column("setting")
    table.add_column("value")
    for key, value in (("spacing (mm)", the_plan.preprocess.spacing_mm), ("HU window", the_plan.preprocess.hu_window),
                       ("patch (voxels)", the_plan.patch_size), ("batch", the_plan.batch_size),
                       ("network", f"{the_plan.network.architecture} {the_plan.network.channels}"),
                       ("mirror pairs", the_plan.mirror_pairs or "none")):
        table.add_row(key, str(value))
    console.print(table)
    for note in the_plan.notes:
        console.print(f"- {note}")


@app.command()
def train(
    site: list[Path] = typer.Option([], help="Site folder(s); several = pooled (centralised) training."),
    out: Optional[Path] = typer.Option(None, help="Where model.pt, plan.json and history.json go (default from the config)."),
    amplified: Optional[Path] = typer.Option(None, help="Amplification output root (out of `fadal amplify`)."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (default from the config)."),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget in minutes (stops at it; the schedule follows it)."),
    config: Optional[Path] = typer.Option(None, help="Training YAML (fadal.config.TrainRunConfig: sites, train, plan, planner)."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="A plan.json from `fadal plan` (default: plan now)."),
) -> None:
    """Train one model on one site's data (local) or several sites pooled (centralised upper bound)."""
    from fadal.config import SiteSpec, TrainRunConfig, load_yaml
    from fadal.model.centralised import train_centralised
    from fadal.records import Plan

    try:
        cfg = load_yaml(TrainRunConfig, config) if config else TrainRunConfig()
        specs = list(cfg.sites) + [SiteSpec(name=s.name, data=s, amplified=(amplified / s.name) if amplified else None,
                                            use_amplified=amplified is not None) for s in site]
        if not specs:
            raise FadalInputError("no sites: give --site DIR or `sites:` in the --config YAML")
        the_plan = cfg.plan
        if plan_file is not None:
            if not plan_file.is_file():
                raise FadalInputError(f"{plan_file}: plan file not found")
            try:
                the_plan = Plan.model_validate_json(plan_file.read_text())
            except ValueError as err:  # pydantic's ValidationError is a ValueError
                raise FadalInputError(f"{plan_file}: not a valid plan ({str(err).splitlines()[0]}); make one with "
                                      "`fadal plan`") from None
        budget_min = minutes or cfg.train.minutes
        total = steps or (10 ** 9 if budget_min else cfg.train.steps)
        with _Bar("training", total=budget_min * 60 if budget_min else total) as bar:  # steps, or seconds

            def progress(step: int, _steps: int, loss: float, elapsed: float) -> None:
                bar.update(completed=elapsed if budget_min else step, description=f"step {step} loss {loss:.3f}")

            ckpt = train_centralised(specs, out or cfg.out, cfg.train, the_plan, cfg.planner, steps=total,
                                     minutes=minutes, progress=progress, log=console.print)
    except FadalInputError as err:
        _fail(err)
    console.print(f"model: {ckpt}")


@app.command()
def federate(
    config: Path = typer.Option(..., help="Federation YAML (fadal.config.FederationConfig): sites, rounds, strategy."),
    deployment: bool = typer.Option(False, help="Submit the run to a running SuperLink (`fadal server`) whose "
                                    "hospitals run `fadal site`, instead of simulating all sites here."),
    server: Optional[str] = typer.Option(None, help="With --deployment: the SuperLink's HOST:PORT."),
    certs: Optional[Path] = typer.Option(None, help="With --deployment: the output of `fadal certs` (or its "
                                         "coordinator/ folder): coordinator/ca.crt verifies the SuperLink, "
                                         "operator/control.token authenticates this command."),
    operator_token: Optional[Path] = typer.Option(None, help="With --deployment: the operator's token file "
                                                  "(default operator/control.token in or beside --certs)."),
    home: Optional[Path] = typer.Option(None, help="With --deployment: Flower's state folder for this command "
                                        "(default ~/.fadal/flower/coordinator)."),
) -> None:
    """Train one model across sites with Flower (simulation engine on this machine, or --deployment).

    Each site's ClientApp reads only its own folder; only model arrays and scalar metrics travel."""
    if deployment:
        from fadal.federated.rounds import read_history

        cfg = submit_federation(config, server, certs, home, operator_token)
        hist_path = Path(cfg.out) / "history.json"
        if hist_path.exists():
            try:
                history = read_history(hist_path)
            except FadalInputError as err:
                _fail(err)
            _print_history(history.rounds)
            _federation_report(cfg, history, evaluate_sites=False)  # the coordinator holds no images
        console.print(f"global model: {cfg.out / 'global_model.pt'}; checkpoints in {cfg.out / 'checkpoints'}")
        return
    from fadal.config import FederationConfig, load_yaml
    from fadal.federated.simulation import simulate

    try:
        cfg = load_yaml(FederationConfig, config)
        history = simulate(cfg)
        _print_history(history.rounds)
        _federation_report(cfg, history, evaluate_sites=True)
    except FadalInputError as err:
        _fail(err)
    console.print(f"global model: {cfg.out / 'global_model.pt'}; checkpoints in {cfg.out / 'checkpoints'}")


def _federation_report(cfg, history, evaluate_sites: bool) -> None:
    from fadal.evaluate.federation import federation_report

    paths = federation_report(cfg, history, evaluate_sites=evaluate_sites)
    if paths is None:
        console.print("no report: no site has held-out cases (imagesTs/ + labelsTs/) and evaluate_every is 0")
    else:
        console.print(f"report: {paths['html']}")


def _print_history(rounds) -> None:
    table = Table(title="federated rounds")
    for col in ("round", "loss", "mean Dice (sites)", "seconds"):
        table.add_column(col)
    for r in rounds:  # fadal.records.RoundEntry: a step the round did not reach is None
        dice = (r.dice or {}).get("mean")
        table.add_row(str(r.round), "–" if r.loss is None else f"{r.loss:.3f}", "–" if dice is None else f"{dice:.3f}",
                      "–" if r.seconds is None else f"{r.seconds:.1f}")
    console.print(table)


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="Checkpoint to evaluate."),
    site: list[Path] = typer.Option(..., help="Site folder(s) with held-out cases in imagesTs/ + labelsTs/."),
    out: Path = typer.Option(Path("runs/evaluate"), help="metrics.json, report.html and predictions go here."),
    name: str = typer.Option("model", help="Name of this model in tables."),
) -> None:
    """Dice, HD95 and surface Dice per organ per site; writes metrics.json and an HTML/Markdown report."""
    from fadal.evaluate.evaluate import evaluate_checkpoint
    from fadal.evaluate.metrics_document import metrics_document
    from fadal.evaluate.report import write_run_report

    try:
        results = evaluate_checkpoint(model, site, out)
    except FadalInputError as err:
        _fail(err)
    doc = metrics_document({name: results})
    history = _load_json(model.parent / "history.json")
    paths = write_run_report(out, doc, history={name: history["rounds"]} if history else None)
    _print_comparison(doc)
    console.print(f"report: {paths['html']}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A folder with metrics.json (and optionally history.json).")) -> None:
    """(Re)build report.html / report.md from a run folder's metrics."""
    from fadal.evaluate.report import write_report

    metrics = _load_json(run_dir / "metrics.json")
    if metrics is None:
        _fail(FadalInputError(f"{run_dir}: no metrics.json (run `fadal evaluate` first)"))
    history = _load_json(run_dir / "history.json")
    if history is not None and "schema_version" in history:  # a federation's out: (records.FederationHistory)
        from fadal.federated.rounds import read_history

        try:
            federation = read_history(run_dir / "history.json")
        except FadalInputError as err:
            _fail(err)
        strategy = (federation.config or {}).get("strategy", "fedavg")
        history = {f"federated ({strategy})": federation.report_rounds()}
    paths = write_report(run_dir, metrics, history=history)  # else: {variant: rounds}, as the demo writes it
    console.print(f"report: {paths['html']}")


def _print_comparison(metrics: dict, title: str = "Dice per site and organ") -> None:
    from fadal.evaluate.tables import comparison_table

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
    from fadal.model.net import device_summary

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
