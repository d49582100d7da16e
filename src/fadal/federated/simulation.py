"""One-machine federation with Flower's simulation engine (every site a virtual SuperNode).

The sites still only ever read their own folder inside their ClientApp; the coordinator only
receives arrays and scalar metrics, exactly as in a deployment.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig
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


class InProcessBackend(Backend):
    """Flower's simulation Backend without Ray: each message's ClientApp runs in this process, one at a time.

    What FADAL configures Ray for anyway (one site at a time with every core and GPU), minus Ray's start
    (~30 s on 2 cores: 4-6 % of a 10-round benchmark federation). Messages and contexts are copied in and
    out, so that a ClientApp cannot change what the server or another site holds, as with Ray's pickling."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise ValueError("InProcessBackend.build() was not called")
        app = self.app_fn()
        context = copy.deepcopy(context)
        try:
            out = app(message=copy.deepcopy(message), context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:  # what Flower's Ray actor does: an error reply to the server
            raise ClientAppException(str(ex)) from ex
        return out, context


@contextmanager
def simulation_backend(kind: str) -> Iterator[None]:
    """Make Flower's simulation engine use ``kind`` ('in-process' or 'ray') while the block runs.

    Flower 1.42 builds its simulation backend by importing ``RayBackend`` from
    ``flwr.server.superlink.fleet.vce.backend.raybackend`` when a run starts, with no setting to pick another;
    for 'in-process' that name is :class:`InProcessBackend` during the block (restored after)."""
    if kind == "ray":
        yield
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = InProcessBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original


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
    with simulation_backend(cfg.simulation_backend):
        run_simulation(server_app=build_server_app(cfg, labels, len(runtimes)),
                       client_app=build_client_app(runtimes), num_supernodes=len(runtimes), backend_config=backend)
    hist_path = out / "history.json"
    history = read_history(hist_path) if hist_path.exists() else FederationHistory()
    done = [r for r in history.rounds if r.loss is not None]
    if len(done) < cfg.rounds:
        raise RuntimeError(f"federated run stopped after {len(done)}/{cfg.rounds} rounds; see the log above ({out})")
    return history
