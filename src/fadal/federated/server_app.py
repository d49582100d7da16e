"""The coordinator side of federation: a Flower ``ServerApp`` that never sees a voxel.

It owns the global model, sends it with the training configuration, aggregates what sites send
back (see :mod:`fadal.federated.strategies`), checkpoints the global model after every round and
writes the per-round history that the report plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fadal.config import FederationConfig
from fadal.data.io import write_json
from fadal.federated.strategies import build_strategy
from fadal.model.infer import save_checkpoint
from fadal.model.net import build_network
from fadal.model.train import seed_everything


def train_config_record(cfg: FederationConfig, labels: dict[str, int]) -> ConfigRecord:
    """Everything a site needs to train the same network the same way (no data, no paths)."""
    return ConfigRecord({
        "local-epochs": cfg.local_epochs,
        "train-config": cfg.train.model_dump_json(),
        "preprocess-config": cfg.preprocess.model_dump_json(),
        "labels": json.dumps(labels),
        "proximal-mu": 0.0,
    })


def run_federation(grid: Grid, cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> dict:
    """Run ``cfg.rounds`` rounds; checkpoint every round; return the history."""
    seed_everything(cfg.train.seed)
    out = Path(cfg.out)
    model = build_network(max(labels.values()) + 1, cfg.train)
    min_sites = cfg.min_sites or num_sites
    history: dict = {"rounds": [], "config": cfg.model_dump(mode="json")}
    strategy = build_strategy(cfg, min_sites, history)
    round_start = [time.perf_counter()]

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by the strategy before round 1 (round 0) and after each round's aggregation."""
        model.load_state_dict(arrays.to_torch_state_dict())
        if server_round > 0:
            save_checkpoint(model, out / "checkpoints" / f"round_{server_round:03d}.pt", labels, cfg.train,
                            cfg.preprocess, {"round": server_round})
            save_checkpoint(model, out / "global_model.pt", labels, cfg.train, cfg.preprocess, {"round": server_round})
            entry = history["rounds"][-1] if history["rounds"] and history["rounds"][-1]["round"] == server_round else None
            if entry is not None:
                entry["seconds"] = time.perf_counter() - round_start[0]
            write_json(history, out / "history.json")
        round_start[0] = time.perf_counter()
        return None

    record = train_config_record(cfg, labels)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.rounds,
                   train_config=record, evaluate_config=record, evaluate_fn=checkpoint)
    write_json(history, out / "history.json")
    return history


def build_server_app(cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, labels, num_sites)

    return app


def _deployment_main(grid: Grid, context: Context) -> None:
    """Deployment: the run config carries the path of the federation YAML on the coordinator."""
    from fadal.config import load_yaml

    cfg = load_yaml(FederationConfig, str(context.run_config["fadal-config"]))
    labels = json.loads(str(context.run_config["labels"]))
    run_federation(grid, cfg, labels, len(cfg.sites))


app = ServerApp()
app.main()(_deployment_main)
