"""`fadal certs`, `fadal server`, `fadal site`: the deployment roles (Flower's deployment engine across
hospitals; see fadal.federated.certificates, processes, flower_cli and the README).

A typer sub-app: cli.py adds it to `fadal` without a group name, so the roles stay `fadal certs` etc."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from fadal.errors import FadalInputError

if TYPE_CHECKING:
    from fadal.config import FederationConfig

deploy_app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
#: Where `fadal --help` lists the roles.
PANEL = "Deployment across hospitals"
console = Console()


def fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
    raise typer.Exit(2)


def flower_home(home: Optional[Path], role: str) -> Path:
    """Flower's state (installed app bundles, connection config) per role, never ~/.flwr."""
    return home or Path.home() / ".fadal" / "flower" / role


def party_certs(certs: Path, party: str) -> Path:
    """A party's own folder from `fadal certs`, or that folder inside the whole output."""
    return certs / party if (certs / party).is_dir() else certs


def local_address(host: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@deploy_app.command(rich_help_panel=PANEL)
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
    from fadal.federated.certificates import make_certificates

    try:
        made = make_certificates(out, [s.strip() for s in sites.split(",") if s.strip()], server_host)
    except FadalInputError as err:
        fail(err)
    console.print(f"{made['coordinator']}: stays with the coordinator (ca.key, server.key: secret)")
    for name, folder in made["sites"].items():
        console.print(f"{folder}: give to {name} only (supernode.key: secret)")


@deploy_app.command(rich_help_panel=PANEL)
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
    from fadal.federated.certificates import COORDINATOR
    from fadal.federated.flower_cli import register_supernodes, write_connection
    from fadal.federated.processes import start_superlink, stop, wait_for_port, wait_foreground

    folder = party_certs(certs, COORDINATOR)
    flwr_home = flower_home(home, "server")
    proc = start_superlink(folder, port, database, flwr_home, host=host)
    try:
        wait_for_port(host, port, proc)
        write_connection(flwr_home, local_address(host, port), folder / "ca.crt")
        registered = register_supernodes(folder, flwr_home)
    except (RuntimeError, TimeoutError, OSError) as err:
        stop([proc])
        fail(err)
    console.print(f"SuperLink on {host}:{port}; sites allowed: {', '.join(registered) or 'none'}; Ctrl-C stops it")
    raise typer.Exit(wait_foreground([proc]) or 0)


@deploy_app.command(rich_help_panel=PANEL)
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
    policy: Optional[Path] = typer.Option(None, help="This site's privacy policy (YAML, fadal.config.SitePolicy): "
                                          "messages that break it are refused."),
    port: int = typer.Option(9094, help="Local port of the SuperNode's runtime API (loopback only; open nothing)."),
    home: Optional[Path] = typer.Option(None, help="Flower's state folder (default ~/.fadal/flower/site-NAME)."),
    restart_after: float = typer.Option(15.0, help="Seconds before restarting the SuperNode when it exits with an "
                                        "error (0 = exit instead)."),
) -> None:
    """Run this hospital's Flower SuperNode in the foreground; it connects out to the SuperLink (no inbound port).

    Only model parameters and allow-listed scalar metrics leave this machine. Ctrl-C stops it."""
    import time

    from fadal.config import SitePolicy, load_yaml
    from fadal.data.site import load_site
    from fadal.federated.processes import start_supernode, wait_foreground

    try:
        found = load_site(data, name=name, validate=False)
        if policy is not None:
            load_yaml(SitePolicy, policy)  # a broken policy file stops here, not in every ClientApp
    except FadalInputError as err:
        fail(err)
    console.print(f"{name}: {len(found.labeled)} labeled, {len(found.unlabeled)} unlabeled, {len(found.test)} "
                  f"held-out scans in {data}")
    flwr_home = flower_home(home, f"site-{name}")
    while True:
        try:
            proc = start_supernode(party_certs(certs, name), server, data, name, port, flwr_home,
                                   cache_dir=cache, amplified=amplified, policy=policy)
        except FadalInputError as err:
            fail(err)
        code = wait_foreground([proc])
        if code in (None, 0) or restart_after <= 0:
            raise typer.Exit(code or 0)
        # e.g. the SuperLink still counts a crashed predecessor as online for up to a minute.
        console.print(f"SuperNode exited with code {code}; restarting in {restart_after:.0f} s (Ctrl-C stops)")
        time.sleep(restart_after)


def submit_federation(config: Path, server: Optional[str], certs: Optional[Path],
                      home: Optional[Path]) -> FederationConfig:
    """`fadal federate --deployment`: submit the federation YAML to the SuperLink and wait for the run.

    Returns the run's FederationConfig once the run completed; a run that failed or could not start is an
    error (exit 2) saying that the output folder keeps the last finished round."""
    from fadal.config import FederationConfig, load_yaml
    from fadal.federated.certificates import COORDINATOR
    from fadal.federated.flower_cli import CONNECTION, submit_run, write_app, write_connection

    if not server or not certs:
        fail(FadalInputError("--deployment needs --server HOST:PORT and --certs DIR (the coordinator's folder)"))
    flwr_home = flower_home(home, "coordinator")
    try:
        cfg = load_yaml(FederationConfig, config)
        write_connection(flwr_home, server, party_certs(certs, COORDINATOR) / "ca.crt")
        result = submit_run(write_app(flwr_home / "app"), CONNECTION, config, flwr_home,
                            echo=lambda line: console.print(line, markup=False, highlight=False))
    except (FadalInputError, RuntimeError) as err:
        fail(err)
    if not result["ok"]:
        fail(RuntimeError(f"run {result['run_id']} ended {result['status']} ({result.get('status-details')}); "
                          f"{cfg.out} keeps the last finished round: run the same command again to resume"))
    return cfg
