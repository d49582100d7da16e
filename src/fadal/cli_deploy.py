"""`fadal site-keys`, `fadal certs`, `fadal server`, `fadal site`: the deployment roles (Flower's deployment
engine across hospitals; see fadal.federated.certificates, processes, flower_cli and the README).

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
    site_keys: Optional[Path] = typer.Option(None, help="Folder with each hospital's public key as <site>.pub (made "
                                             "there with `fadal site-keys`; the file name is the site's name)."),
    out: Path = typer.Option(Path("certs"), help="Output: coordinator/ is what `fadal server` reads; each <site>/ "
                             "(its ca.crt) goes to that hospital; ca/ is the CA (see --ca)."),
    ca: Optional[Path] = typer.Option(None, help="The CA's folder (ca.crt, ca.key), default OUT/ca: made on the "
                                      "first run, needed again to add sites or re-issue the server certificate. "
                                      "Keep it offline, never in the SuperLink's folder."),
    server_host: str = typer.Option("127.0.0.1", help="Host name or IP address hospitals use to reach the SuperLink "
                                    "(written into its TLS certificate)."),
    generate_site_keys: Optional[str] = typer.Option(None, help="TRIALS ON ONE MACHINE ONLY: comma-separated site "
                                                     "names whose private keys this command generates (in "
                                                     "OUT/<site>/), so this machine could impersonate them. Across "
                                                     "hospitals use --site-keys."),
) -> None:
    """Coordinator: make the CA and the SuperLink's TLS certificate, and register the hospitals' public keys.

    Each hospital makes its own key pair (`fadal site-keys`) and sends only its <site>.pub: this command
    never sees a hospital's private key. Re-run with more <site>.pub files to add hospitals (the CA and the
    sites registered before are kept), or with neither option to re-issue the server certificate."""
    from fadal.federated.certificates import make_certificates, make_trial_certificates, public_keys_in

    try:
        if site_keys is not None and generate_site_keys is not None:
            raise FadalInputError("give --site-keys (the hospitals' public keys) or --generate-site-keys (a trial "
                                  "on one machine), not both")
        if generate_site_keys is not None:
            made = make_trial_certificates(out, [s.strip() for s in generate_site_keys.split(",") if s.strip()],
                                           server_host, ca_dir=ca)
        else:
            made = make_certificates(out, public_keys_in(site_keys) if site_keys is not None else {}, server_host,
                                     ca_dir=ca)
    except FadalInputError as err:
        fail(err)
    for note in made["notes"]:
        console.print(note, soft_wrap=True)
    console.print(f"{made['ca_dir']}: the CA (ca.key: secret). Keep it offline, not on the SuperLink's machine; "
                  f"give it as --ca to re-run fadal certs", soft_wrap=True)
    console.print(f"{made['coordinator']}: for `fadal server --certs {made['coordinator']}` (server.key: secret); "
                  f"sites registered: {', '.join(made['sites'])}", soft_wrap=True)
    for name, folder in made["sites"].items():
        if generate_site_keys is not None:
            console.print(f"{folder}: {name}'s whole folder, including its private key (supernode.key: secret; "
                          f"trial only)", soft_wrap=True)
        else:
            console.print(f"{folder / 'ca.crt'}: send to {name} (public), for the folder that holds its "
                          f"supernode.key", soft_wrap=True)
            if (folder / "supernode.key").exists():  # made here by an earlier version of fadal certs
                console.print(f"[bold yellow]warning:[/] {folder / 'supernode.key'} is {name}'s private key, made "
                              f"on this machine by an earlier version: once {name} holds it (or made its own), "
                              f"delete it here", soft_wrap=True)


@deploy_app.command("site-keys", rich_help_panel=PANEL)
def site_keys(
    name: str = typer.Option(..., help="This site's name (also its SuperNode name): the coordinator registers "
                             "the key under it."),
    out: Path = typer.Option(..., help="This hospital's key folder (then give it to `fadal site --certs`)."),
    force: bool = typer.Option(False, help="Replace an existing private key (the coordinator must then register "
                               "the new .pub)."),
) -> None:
    """Hospital: make this site's SuperNode key pair. Only the .pub goes to the coordinator.

    Writes OUT/supernode.key (secret, mode 0600; it never leaves this machine) and OUT/NAME.pub."""
    from fadal.federated.certificates import make_site_keys

    try:
        made = make_site_keys(out, name, force=force)
    except FadalInputError as err:
        fail(err)
    console.print(f"{made['private_key']}: this site's private key (secret, mode 0600): keep it here, send it to "
                  f"no one", soft_wrap=True)
    console.print(f"{made['public_key']}: send this file, and only this one, to the coordinator (for "
                  f"`fadal certs --site-keys`)", soft_wrap=True)
    console.print(f"Then put the ca.crt the coordinator sends back into {out} and run `fadal site --name {name} "
                  f"--certs {out} ...`", soft_wrap=True)


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
    operator_token: Optional[Path] = typer.Option(None, help="The operator's token file (default: operator/"
                                                  "control.token beside or inside CERTS), to register the sites."),
) -> None:
    """Run the coordinator's Flower SuperLink in the foreground (TLS; only registered hospitals may connect).

    Registers every key in CERTS/supernodes/ at start. Runs are taken only with the operator's token
    (`fadal certs` wrote it to operator/control.token). Ctrl-C stops it."""
    from fadal.federated.certificates import COORDINATOR, find_operator_token, read_operator_token
    from fadal.federated.flower_cli import register_supernodes, write_connection
    from fadal.federated.processes import start_superlink, stop, wait_for_port, wait_foreground

    folder = party_certs(certs, COORDINATOR)
    if (folder / "ca.key").exists():
        console.print(f"[bold yellow]warning:[/] {folder / 'ca.key'} (the CA's key) lies in the SuperLink's folder: "
                      f"re-run `fadal certs` to move it to its own folder, and keep that offline", soft_wrap=True)
    flwr_home = flower_home(home, "server")
    try:
        token = read_operator_token(operator_token or find_operator_token(certs))
        proc = start_superlink(folder, port, database, flwr_home, host=host)
    except FadalInputError as err:
        fail(err)
    try:
        wait_for_port(host, port, proc)
        write_connection(flwr_home, local_address(host, port), folder / "ca.crt", token=token)
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
    name: str = typer.Option(..., help="This site's name, as given to `fadal site-keys --name`."),
    server: str = typer.Option(..., help="The SuperLink's HOST:PORT."),
    certs: Path = typer.Option(..., help="This hospital's key folder: supernode.key from `fadal site-keys` and the "
                               "coordinator's ca.crt."),
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
                      home: Optional[Path], operator_token: Optional[Path] = None) -> FederationConfig:
    """`fadal federate --deployment`: submit the federation YAML to the SuperLink and wait for the run.

    Returns the run's FederationConfig once the run completed; a run that failed or could not start is an
    error (exit 2) saying that the output folder keeps the last finished round. The SuperLink takes the
    run only with the operator's token (``operator_token``, default operator/control.token in or beside
    ``certs``)."""
    from fadal.config import FederationConfig, load_yaml
    from fadal.federated.certificates import COORDINATOR, find_operator_token, read_operator_token
    from fadal.federated.flower_cli import CONNECTION, submit_run, write_app, write_connection

    if not server or not certs:
        fail(FadalInputError("--deployment needs --server HOST:PORT and --certs DIR (the output of `fadal certs`, "
                             "or its coordinator/ folder)"))
    flwr_home = flower_home(home, "coordinator")
    try:
        cfg = load_yaml(FederationConfig, config)
        token = read_operator_token(operator_token or find_operator_token(certs))
        write_connection(flwr_home, server, party_certs(certs, COORDINATOR) / "ca.crt", token=token)
        result = submit_run(write_app(flwr_home / "app"), CONNECTION, config, flwr_home,
                            echo=lambda line: console.print(line, markup=False, highlight=False))
    except (FadalInputError, RuntimeError) as err:
        fail(err)
    if not result["ok"]:
        fail(RuntimeError(f"run {result['run_id']} ended {result['status']} ({result.get('status-details')}); "
                          f"{cfg.out} keeps the last finished round: run the same command again to resume"))
    return cfg
