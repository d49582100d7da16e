"""The coordinator side of federation: a Flower ``ServerApp`` that never sees a voxel.

It owns the global model, sends it with the training configuration, aggregates what sites send
back (see :mod:`fadal.federated.strategies`), checkpoints the global model after every round and
writes the per-round history that the report plots.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fadal.config import FederationConfig
from fadal.data.io import FadalInputError, save_torch, write_json
from fadal.federated.strategies import build_strategy
from fadal.model.infer import save_checkpoint
from fadal.model.net import build_network
from fadal.model.train import seed_everything


def train_config_record(cfg: FederationConfig, labels: dict[str, int]) -> ConfigRecord:
    """Everything a site needs to train the same network the same way (no data, no paths).

    Read by :func:`fadal.federated.client_app.local_train`: ``proximal-mu`` (FedProx term, 0 unless
    strategy 'fedprox'), ``local-norm`` (FedBN: keep normalisation layers at the site),
    ``transfer-dtype``, ``partial-label-mode``/``distill-*`` (ConDistFL) and ``dp-clip``/``dp-noise-multiplier``
    (client-side differential privacy; ``dp-clip`` 0 = off)."""
    return ConfigRecord({
        "local-epochs": cfg.local_epochs,
        "train-config": cfg.train.model_dump_json(),
        "preprocess-config": cfg.preprocess.model_dump_json(),
        "labels": json.dumps(labels),
        "strategy": cfg.strategy,
        "proximal-mu": float(cfg.proximal_mu) if cfg.strategy == "fedprox" else 0.0,
        "local-norm": cfg.strategy == "fedbn",
        "transfer-dtype": cfg.transfer_dtype,
        "partial-label-mode": cfg.partial_label_mode,
        "distill-weight": float(cfg.distill_weight),
        "distill-temperature": float(cfg.distill_temperature),
        "dp-clip": float(cfg.dp_clip or 0.0),
        "dp-noise-multiplier": float(cfg.dp_noise_multiplier),
    })


def _resume_point(cfg: FederationConfig, labels: dict[str, int], model: torch.nn.Module) -> tuple[int, dict | None]:
    """Last finished round of an earlier run in ``cfg.out`` (weights loaded into ``model``) and its history.

    ``global_model.pt`` is written last in each round, so its round is the one to continue from;
    history entries of later rounds (written just before a crash) are dropped and redone.
    """
    out = Path(cfg.out)
    ckpt_path, hist_path = out / "global_model.pt", out / "history.json"
    if not (cfg.resume and ckpt_path.exists() and hist_path.exists()):
        return 0, None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    try:
        if {k: int(v) for k, v in ckpt["labels"].items()} != labels:
            raise ValueError(f"labels {ckpt['labels']} differ from {labels}")
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError) as err:
        raise FadalInputError(f"{ckpt_path}: cannot resume this earlier run ({err}); use a new `out:` or "
                              "`resume: false`") from err
    done = int(ckpt["round"])
    history = json.loads(hist_path.read_text())
    history["rounds"] = [r for r in history.get("rounds", []) if r["round"] <= done]
    return done, history


#: Strategy attributes that must survive a restart: FedAdam/FedYogi moments, the DP accountant.
_STATEFUL = ("m_t", "v_t", "privacy")


def _save_strategy_state(strategy, path: Path, server_round: int) -> None:
    state = {k: getattr(strategy, k) for k in _STATEFUL if getattr(strategy, k, None) is not None}
    if state:
        save_torch({"round": server_round, **state}, path)


def _load_strategy_state(strategy, path: Path, server_round: int) -> None:
    if not path.exists():
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["round"] != server_round:
        log(WARNING, "%s is of round %s, not %s: strategy state starts afresh", path, state["round"], server_round)
        return
    for key in _STATEFUL:
        if key in state:
            setattr(strategy, key, state[key])


def _entry(history: dict, server_round: int) -> dict:
    """This round's history entry (the strategy records sites, loss and bytes in it)."""
    for entry in history["rounds"]:
        if entry["round"] == server_round:
            return entry
    history["rounds"].append({"round": server_round})
    return history["rounds"][-1]


def run_federation(grid: Grid, cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> dict:
    """Run rounds up to ``cfg.rounds``, checkpointing after each; return the history.

    Flower's ``Strategy.start`` loop, written out so that it can start at a later round (resume)
    and so that a round with a failed or vanished site still counts when at least ``min_sites``
    sites answered (aggregated over those). With fewer the run stops with an error; the last
    round's checkpoint stays, and submitting the run again continues from there.
    """
    seed_everything(cfg.train.seed)
    out = Path(cfg.out)
    model = build_network(max(labels.values()) + 1, cfg.train)
    min_sites = cfg.min_sites or num_sites
    done, history = _resume_point(cfg, labels, model)
    if history is None:
        history = {"rounds": []}
    history["config"] = cfg.model_dump(mode="json")
    strategy = build_strategy(cfg, min_sites, history, num_sites=num_sites)
    if done:
        _load_strategy_state(strategy, out / "checkpoints" / "server_state.pt", done)
        history.setdefault("resumed_after", []).append(done)
        log(INFO, "Resuming %s after round %s of %s", out, done, cfg.rounds)
    arrays = ArrayRecord(model.state_dict())
    record = train_config_record(cfg, labels)

    for rnd in range(done + 1, cfg.rounds + 1):
        log(INFO, "[ROUND %s/%s]", rnd, cfg.rounds)
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(rnd, arrays, record, grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        answered = [m for m in replies if not m.has_error()]
        if len(answered) < min_sites:
            raise RuntimeError(f"round {rnd}: {len(answered)} of {len(messages)} sites answered, min_sites is "
                               f"{min_sites}; {out} holds round {rnd - 1}: submit the run again to resume")
        aggregated, _ = strategy.aggregate_train(rnd, replies)
        arrays = aggregated if aggregated is not None else arrays
        entry = _entry(history, rnd)
        entry["sampled"] = len(messages)
        entry["failures"] = len(messages) - len(answered)  # errors and sites that never answered

        evaluate_round(strategy, grid, rnd, arrays, record, cfg.round_timeout)
        model.load_state_dict(arrays.to_torch_state_dict())
        entry["seconds"] = time.perf_counter() - t0
        save_round(model, cfg, labels, history, rnd, strategy)
    write_json(history, out / "history.json")
    return history


def evaluate_round(strategy, grid: Grid, rnd: int, arrays: ArrayRecord, record: ConfigRecord, timeout: float) -> None:
    """Federated evaluation of the global model when ``strategy`` says it is due (Dice into the history)."""
    evaluate = list(strategy.configure_evaluate(rnd, arrays, record, grid))
    if evaluate:
        strategy.aggregate_evaluate(rnd, grid.send_and_receive(evaluate, timeout=timeout))


def save_round(model: torch.nn.Module, cfg: FederationConfig, labels: dict[str, int], history: dict, rnd: int,
               strategy) -> None:
    """Round checkpoint, history and server state; ``global_model.pt`` last (the round a restart continues from)."""
    out = Path(cfg.out)
    save_checkpoint(model, out / "checkpoints" / f"round_{rnd:03d}.pt", labels, cfg.train, cfg.preprocess,
                    {"round": rnd})
    write_json(history, out / "history.json")
    _save_strategy_state(strategy, out / "checkpoints" / "server_state.pt", rnd)
    save_checkpoint(model, out / "global_model.pt", labels, cfg.train, cfg.preprocess, {"round": rnd})


def build_server_app(cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _run(grid, context, cfg, labels, num_sites)

    return app


def _run(grid: Grid, context: Context, cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> dict:
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
