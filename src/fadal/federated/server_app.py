"""The coordinator side of federation: a Flower ``ServerApp`` that never sees a voxel.

It owns the global model, sends it with the training configuration, aggregates what sites send
back (see :mod:`fadal.federated.strategies`), checkpoints the global model after every round and
writes the per-round history that the report plots. Before the first round it fixes the run's plan
(:mod:`fadal.federated.planning`: from the config, the checkpoint being resumed, or the sites'
fingerprints).
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fadal.config import FederationConfig
from fadal.federated.planning import federation_plan, wait_for_sites
from fadal.federated.rounds import (evaluate_round, load_strategy_state, resume_point, save_round, site_status,
                                    train_config_record, write_history, write_live_page)
from fadal.records import FederationHistory
from fadal.federated.strategies import build_strategy
from fadal.model.engine import seed_everything
from fadal.model.net import build_network


def run_federation(grid: Grid, cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> FederationHistory:
    """Run rounds up to ``cfg.rounds``, checkpointing after each; return the history.

    Flower's ``Strategy.start`` loop, written out so that it can start at a later round (resume)
    and so that a round with a failed or vanished site still counts when at least ``min_sites``
    sites answered (aggregated over those). With fewer the run stops with an error; the last
    round's checkpoint stays, and submitting the run again continues from there. ``out/report.html``
    is rewritten after every round (the live page: progress, each site's status, curves so far).
    """
    seed_everything(cfg.train.seed)
    out = Path(cfg.out)
    plan = federation_plan(grid, cfg, labels, num_sites)
    model = build_network(max(labels.values()) + 1, plan.network)
    min_sites = cfg.min_sites or num_sites
    done, history = resume_point(cfg, labels, model)
    history.config = cfg.model_dump(mode="json")
    strategy = build_strategy(cfg, min_sites, history, num_sites=num_sites, plan=plan)
    if done:
        load_strategy_state(strategy, out / "checkpoints" / "server_state.pt", done)
        history.resumed_after.append(done)
        log(INFO, "Resuming %s after round %s of %s", out, done, cfg.rounds)
    arrays = ArrayRecord(model.state_dict())
    record = train_config_record(cfg, labels, plan)
    wait_for_sites(grid, num_sites, cfg.join_timeout)

    try:
        for rnd in range(done + 1, cfg.rounds + 1):
            log(INFO, "[ROUND %s/%s]", rnd, cfg.rounds)
            t0 = time.perf_counter()
            messages = list(strategy.configure_train(rnd, arrays, record, grid))
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
            answered = [m for m in replies if not m.has_error()]
            entry = history.entry(rnd)
            entry.site_status = site_status(messages, replies)
            if len(answered) < strategy.min_train_nodes:  # min_sites; 1 under 'cyclic'
                raise RuntimeError(f"round {rnd}: {len(answered)} of {len(messages)} sites answered, "
                                   f"{strategy.min_train_nodes} must; {out} holds round {rnd - 1}: submit the run "
                                   "again to resume")
            aggregated, _ = strategy.aggregate_train(rnd, replies)
            arrays = aggregated if aggregated is not None else arrays
            entry.sampled = len(messages)
            entry.failures = len(messages) - len(answered)  # errors and sites that never answered

            evaluate_round(strategy, grid, rnd, arrays, record, cfg.round_timeout)
            model.load_state_dict(arrays.to_torch_state_dict())
            entry.seconds = time.perf_counter() - t0
            save_round(model, cfg, plan, labels, history, rnd, strategy)
            write_live_page(cfg, history, "finished" if rnd == cfg.rounds else "running")
    except Exception as err:
        write_live_page(cfg, history, "stopped", str(err))
        raise
    write_history(history, out)
    return history


def build_server_app(cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _run(grid, context, cfg, labels, num_sites)

    return app


def _run(grid: Grid, context: Context, cfg: FederationConfig, labels: dict[str, int], num_sites: int
         ) -> FederationHistory:
    """The plain Message-API loop, or the SecAgg+ one when ``cfg.secure_aggregation``."""
    if cfg.secure_aggregation:
        from fadal.federated.secure_aggregation import run_secure_federation

        return run_secure_federation(grid, context, cfg, labels, num_sites)
    return run_federation(grid, cfg, labels, num_sites)


def _deployment_main(grid: Grid, context: Context) -> None:
    """Deployment: the run config carries the path of the federation YAML on the coordinator."""
    from fadal.config import load_yaml

    cfg = load_yaml(FederationConfig, str(context.run_config["fadal-config"]))
    labels = json.loads(str(context.run_config["labels"]))
    _run(grid, context, cfg, labels, len(cfg.sites))


app = ServerApp()
app.main()(_deployment_main)
