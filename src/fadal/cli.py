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
        console.print(f"{name}: {s['n_scans']} scans amplified ({s['n_registrations_this_run']} new registrations) in {s['total_seconds']:.1f} s -> {out / name}")


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
    deployment: bool = typer.Option(False, help="Submit the run to a running SuperLink (`fadal server`) whose "
                                    "hospitals run `fadal site`, instead of simulating all sites here."),
    server: Optional[str] = typer.Option(None, help="With --deployment: the SuperLink's HOST:PORT."),
    certs: Optional[Path] = typer.Option(None, help="With --deployment: the coordinator's folder from `fadal certs` "
                                         "(its ca.crt verifies the SuperLink)."),
    home: Optional[Path] = typer.Option(None, help="With --deployment: Flower's state folder for this command "
                                        "(default ~/.fadal/flower/coordinator)."),
) -> None:
    """Train one model across sites with Flower (simulation engine on this machine, or --deployment).

    Each site's ClientApp reads only its own folder; only model arrays and scalar metrics travel."""
    from fadal.config import FederationConfig, load_yaml
    from fadal.pipeline import federate as run

    if deployment:
        _federate_deployment(config, server, certs, home)
        return
    try:
        cfg = load_yaml(FederationConfig, config)
        history = run(cfg)
        _print_history(history["rounds"])
        _federation_report(cfg, history, evaluate_sites=True)
    except FadalInputError as err:
        _fail(err)
    console.print(f"global model: {cfg.out / 'global_model.pt'}; checkpoints in {cfg.out / 'checkpoints'}")


def _federation_report(cfg, history: dict, evaluate_sites: bool) -> None:
    from fadal.pipeline import federation_report

    paths = federation_report(cfg, history, evaluate_sites=evaluate_sites)
    if paths is None:
        console.print("no report: no site has held-out cases (imagesTs/ + labelsTs/) and evaluate_every is 0")
    else:
        console.print(f"report: {paths['html']}")


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
    out: Path = typer.Option(Path("predictions"), help="Output folder: <case>.nii.gz label maps in the input's geometry, "
                             "<case>/meshes, <case>/views, <case>/seg.dcm."),
    meshes: bool = typer.Option(True, help="Organ surface meshes (STL, OBJ, VTP; LPS world mm)."),
    views: bool = typer.Option(True, help="3D renders (anterior, oblique) and a CT overlay PNG."),
    dicom_seg: bool = typer.Option(True, help="DICOM-SEG next to DICOM-series inputs."),
    largest_component: bool = typer.Option(True, help="Keep each organ's largest connected component."),
    fill_holes: bool = typer.Option(True, help="Fill holes inside each organ."),
    series: Optional[str] = typer.Option(None, help="SeriesInstanceUID, when a DICOM folder holds several series."),
) -> None:
    """Segment CT volumes and export label maps, surface meshes, views and DICOM-SEG.

    Label maps are written on each input's exact voxel grid. A folder run skips finished cases."""
    from fadal.model.infer import load_checkpoint
    from fadal.pipeline import ExportOptions, predict_case

    options = ExportOptions(largest_component=largest_component, fill_holes=fill_holes, meshes=meshes,
                            views=views, dicom_seg=dicom_seg)
    try:
        net, labels, pre, _ = load_checkpoint(model)
        files = _expand_inputs(inputs, series)
        with _progress() as prog:
            task = prog.add_task("cases", total=len(files))
            for case_id, path in files:
                done = out / case_id / "summary.json"
                if done.exists() and done.stat().st_mtime > path.stat().st_mtime:
                    prog.advance(task)
                    continue
                prog.update(task, description=case_id)
                predict_case(net, labels, pre, path, case_id, out, options, series_uid=series)
                prog.advance(task)
    except FadalInputError as err:
        _fail(err)
    console.print(f"{len(files)} case(s) in {out} (labels: {', '.join(k for k in labels if labels[k])})")


def _expand_inputs(inputs: list[Path], series: str | None = None) -> list[tuple[str, Path]]:
    from fadal.data.site import IMAGE_SUFFIXES, _strip_suffix

    found: list[tuple[str, Path]] = []
    for p in inputs:
        if not p.exists():
            raise FadalInputError(f"{p}: not found")
        if p.is_dir():
            vols = sorted(f for f in p.iterdir() if f.name.endswith(IMAGE_SUFFIXES))
            if vols:
                found += [(_strip_suffix(f.name).removesuffix("_0000"), f) for f in vols]
            else:  # a DICOM series folder (read, and checked, when its turn comes)
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



# --------------------------------------------------------------------------------------------------
# Running across hospitals: Flower's deployment engine (see fadal.federated.deploy and the README)
# --------------------------------------------------------------------------------------------------

def _flower_home(home: Optional[Path], role: str) -> Path:
    """Flower's state (installed app bundles, connection config) per role, never ~/.flwr."""
    return home or Path.home() / ".fadal" / "flower" / role


def _party_certs(certs: Path, party: str) -> Path:
    """A party's own folder from `fadal certs`, or that folder inside the whole output."""
    return certs / party if (certs / party).is_dir() else certs


def _local_address(host: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _federate_deployment(config: Path, server: Optional[str], certs: Optional[Path], home: Optional[Path]) -> None:
    from fadal.config import FederationConfig, load_yaml
    from fadal.federated import deploy
    from fadal.pipeline import load_json

    if not server or not certs:
        _fail(FadalInputError("--deployment needs --server HOST:PORT and --certs DIR (the coordinator's folder)"))
    flwr_home = _flower_home(home, "coordinator")
    try:
        cfg = load_yaml(FederationConfig, config)
        deploy.write_connection(flwr_home, server, _party_certs(certs, deploy.COORDINATOR) / "ca.crt")
        result = deploy.submit_run(deploy.write_app(flwr_home / "app"), deploy.CONNECTION, config, flwr_home,
                                   echo=lambda line: console.print(line, markup=False, highlight=False))
    except (FadalInputError, RuntimeError) as err:
        _fail(err)
    if not result["ok"]:
        _fail(RuntimeError(f"run {result['run_id']} ended {result['status']} ({result.get('status-details')}); "
                           f"{cfg.out} keeps the last finished round: run the same command again to resume"))
    history = load_json(Path(cfg.out) / "history.json")
    if history:
        _print_history(history["rounds"])
        _federation_report(cfg, history, evaluate_sites=False)  # the coordinator holds no images
    console.print(f"global model: {cfg.out / 'global_model.pt'}; checkpoints in {cfg.out / 'checkpoints'}")


@app.command()
def certs(
    sites: str = typer.Option(..., help="Comma-separated hospital names, e.g. site_A,site_B,site_C (also their "
                              "SuperNode names)."),
    out: Path = typer.Option(Path("certs"), help="Output: coordinator/ stays with the coordinator; each <site>/ "
                             "goes to that hospital only."),
    server_host: str = typer.Option("127.0.0.1", help="Host name or IP address hospitals use to reach the SuperLink "
                                    "(written into its TLS certificate)."),
) -> None:
    """Make the federation's keys: a CA, the SuperLink's TLS certificate, one SuperNode key pair per hospital.

    Re-run with more sites to add hospitals: the CA and the existing site keys are kept."""
    from fadal.federated.deploy import make_certificates

    try:
        made = make_certificates(out, [s.strip() for s in sites.split(",") if s.strip()], server_host)
    except FadalInputError as err:
        _fail(err)
    console.print(f"{made['coordinator']}: stays with the coordinator (ca.key, server.key: secret)")
    for name, folder in made["sites"].items():
        console.print(f"{folder}: give to {name} only (supernode.key: secret)")


@app.command()
def server(
    certs: Path = typer.Option(..., help="The coordinator's folder from `fadal certs` (ca.crt, server.crt, "
                               "server.key, supernodes/*.pub)."),
    port: int = typer.Option(9092, help="TCP port for the hospitals' SuperNodes and `fadal federate` (open it "
                             "to them)."),
    database: Path = typer.Option(Path("superlink.db"), help="SQLite file with the SuperLink's state (registered "
                                  "sites, runs); a restarted server continues from it."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    home: Optional[Path] = typer.Option(None, help="Flower's state folder (default ~/.fadal/flower/server)."),
) -> None:
    """Run the coordinator's Flower SuperLink in the foreground (TLS; only registered hospitals may connect).

    Registers every key in CERTS/supernodes/ at start. Ctrl-C stops it."""
    from fadal.federated import deploy

    folder = _party_certs(certs, deploy.COORDINATOR)
    flwr_home = _flower_home(home, "server")
    proc = deploy.start_superlink(folder, port, database, flwr_home, host=host)
    try:
        deploy.wait_for_port(host, port, proc)
        deploy.write_connection(flwr_home, _local_address(host, port), folder / "ca.crt")
        registered = deploy.register_supernodes(folder, flwr_home)
    except (RuntimeError, TimeoutError, OSError) as err:
        deploy.stop([proc])
        _fail(err)
    console.print(f"SuperLink on {host}:{port}; sites allowed: {', '.join(registered) or 'none'}; Ctrl-C stops it")
    raise typer.Exit(deploy.wait_foreground([proc]) or 0)


@app.command()
def site(
    data: Path = typer.Option(..., help="This hospital's site folder (nnU-Net v2 / MSD layout): the only data "
                              "the ClientApp reads."),
    name: str = typer.Option(..., help="This site's name, as given to `fadal certs --sites`."),
    server: str = typer.Option(..., help="The SuperLink's HOST:PORT."),
    certs: Path = typer.Option(..., help="This hospital's folder from `fadal certs` (ca.crt, supernode.key)."),
    amplified: Optional[Path] = typer.Option(None, help="This site's `fadal amplify` output: train on its "
                                             "pseudo-labels too."),
    cache: Optional[Path] = typer.Option(None, help="Local cache (preprocessed volumes, site-local layers); "
                                         "default DATA/.fadal_cache."),
    port: int = typer.Option(9094, help="Local port of the SuperNode's runtime API (loopback only; open nothing)."),
    home: Optional[Path] = typer.Option(None, help="Flower's state folder (default ~/.fadal/flower/site-NAME)."),
    restart_after: float = typer.Option(15.0, help="Seconds before restarting the SuperNode when it exits with an "
                                        "error (0 = exit instead)."),
) -> None:
    """Run this hospital's Flower SuperNode in the foreground; it connects out to the SuperLink (no inbound port).

    Only model parameters and allow-listed scalar metrics leave this machine. Ctrl-C stops it."""
    import time

    from fadal.data.site import load_site
    from fadal.federated import deploy

    try:
        found = load_site(data, name=name, validate=False)
    except FadalInputError as err:
        _fail(err)
    console.print(f"{name}: {len(found.labeled)} labeled, {len(found.unlabeled)} unlabeled, {len(found.test)} "
                  f"held-out scans in {data}")
    flwr_home = _flower_home(home, f"site-{name}")
    while True:
        try:
            proc = deploy.start_supernode(_party_certs(certs, name), server, data, name, port, flwr_home,
                                          cache_dir=cache, amplified=amplified)
        except FadalInputError as err:
            _fail(err)
        code = deploy.wait_foreground([proc])
        if code in (None, 0) or restart_after <= 0:
            raise typer.Exit(code or 0)
        # e.g. the SuperLink still counts a crashed predecessor as online for up to a minute.
        console.print(f"SuperNode exited with code {code}; restarting in {restart_after:.0f} s (Ctrl-C stops)")
        time.sleep(restart_after)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
