"""One-machine federation with Flower's simulation engine (every site a virtual SuperNode).

The sites still only ever read their own folder inside their ClientApp; the coordinator only
receives arrays and scalar metrics, exactly as in a deployment.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.simulation import run_simulation

from fadal.config import FederationConfig
from fadal.data.site import parse_labels, read_dataset_json
from fadal.errors import FadalInputError
from fadal.federated.client_app import build_client_app
from fadal.federated.site_task import SiteRuntime
from fadal.federated.server_app import build_server_app
from fadal.federated.rounds import read_history
from fadal.records import FederationHistory


def federation_labels(cfg: FederationConfig) -> dict[str, int]:
    """The label set the federation agrees on (metadata only, never image data)."""
    if cfg.labels:
        return dict(cfg.labels)
    first = cfg.sites[0].data
    return parse_labels(read_dataset_json(first), first / "dataset.json")


def site_runtimes(cfg: FederationConfig) -> list[SiteRuntime]:
    """Each site's folders and policy as its ClientApp sees them; its cache (FedBN layers, optimiser,
    epsilon ledger unless its policy names one) under ``out/cache``."""
    out = Path(cfg.out)
    return [SiteRuntime(s.name, s.data, s.amplified, s.use_amplified, out / "cache" / s.name, s.policy)
            for s in cfg.sites]


def simulate(cfg: FederationConfig) -> FederationHistory:
    """Run the federation in Flower's simulation engine; returns the per-round history."""
    if len(cfg.sites) < 1:
        raise FadalInputError("federation config lists no sites")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").unlink(missing_ok=True)
    labels = federation_labels(cfg)
    runtimes = site_runtimes(cfg)
    cpus = os.cpu_count() or 1
    gpus = 1 if torch.cuda.is_available() else 0
    # One site trains at a time with every core: on a small machine, concurrent torch processes
    # slow each other down far more than they gain.
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False, "log_to_driver": True},
    }
    run_simulation(server_app=build_server_app(cfg, labels, len(runtimes)),
                   client_app=build_client_app(runtimes), num_supernodes=len(runtimes), backend_config=backend)
    hist_path = out / "history.json"
    history = read_history(hist_path) if hist_path.exists() else FederationHistory()
    done = [r for r in history.rounds if r.loss is not None]
    if len(done) < cfg.rounds:
        raise RuntimeError(f"federated run stopped after {len(done)}/{cfg.rounds} rounds; see the log above ({out})")
    return history
